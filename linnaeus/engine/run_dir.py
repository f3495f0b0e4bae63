"""The run folder, human-readable logs and ``metrics.jsonl``. Both logs are appended across restarts, never truncated."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from linnaeus.config import Config

log = logging.getLogger("linnaeus")


def run_path(cfg: Config) -> Path:
    return cfg.EXPERIMENT.run_folder()


def setup_logging(run: Path, rank: int, is_main: bool, level: str) -> None:
    """Main process: INFO to stderr and logs/train.log. Other ranks: warnings and errors to logs/rank<r>.log and stderr,
    so a failure on any rank leaves its traceback on disk."""
    logs = run / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    log.handlers.clear()
    log.propagate = False
    log.setLevel(getattr(logging, level))
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    stream.setLevel(getattr(logging, level) if is_main else logging.WARNING)
    log.addHandler(stream)
    file = logging.FileHandler(logs / ("train.log" if is_main else f"rank{rank}.log"), mode="a")
    file.setFormatter(fmt)
    file.setLevel(getattr(logging, level) if is_main else logging.WARNING)
    log.addHandler(file)


class MetricsWriter:
    """One JSON object per line: ``step`` (int), ``epoch`` (float), ``phase``, ``time`` and flat metric keys."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, step: int, epoch: float, phase: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "epoch": round(float(epoch), 6), "phase": phase, "time": round(time.time(), 3)}
        row.update({k: (float(v) if isinstance(v, int | float) else v) for k, v in metrics.items()})
        # Line-buffered append: a crash loses at most the line being written, never earlier lines.
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
