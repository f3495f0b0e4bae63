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


# A record with this attribute set goes to the log files only: the CLI prints the same error as its ``error:`` line.
FILE_ONLY_ATTR = "linnaeus_file_only"


def _console_only_once(record: logging.LogRecord) -> bool:
    return not getattr(record, FILE_ONLY_ATTR, False)


def setup_logging(run: Path | None, rank: int, is_main: bool, level: str) -> None:
    """Main process: INFO to the console and logs/train.log. Other ranks: warnings and errors to logs/rank<r>.log and
    the console, so a failure on any rank leaves its traceback on disk.

    ``run=None``: console only, and records are kept until :func:`attach_run_logs` opens the files, so nothing
    said before the run folder exists (the preflight, image verification) is missing from ``train.log``, and a
    failed start needs no run folder. The console handler prints above a live progress bar."""
    from logging.handlers import MemoryHandler

    from linnaeus.engine.progress import console_handler

    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    file_level = getattr(logging, level) if is_main else logging.WARNING
    log.handlers.clear()
    log.propagate = False
    log.setLevel(getattr(logging, level))
    stream = console_handler(file_level, fmt, sys.stderr)
    stream.addFilter(_console_only_once)
    log.addHandler(stream)
    buffer = MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)
    buffer.setLevel(file_level)
    log.addHandler(buffer)
    if run is not None:
        attach_run_logs(run, rank, is_main)


def attach_run_logs(run: Path, rank: int, is_main: bool) -> None:
    """Open logs/train.log (main) or logs/rank<r>.log (others), appending, and write the records kept so far."""
    from logging.handlers import MemoryHandler

    logs = run / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    buffer = next((h for h in log.handlers if isinstance(h, MemoryHandler)), None)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    file = logging.FileHandler(logs / ("train.log" if is_main else f"rank{rank}.log"), mode="a")
    file.setFormatter(fmt)
    file.setLevel(buffer.level if buffer is not None else logging.INFO if is_main else logging.WARNING)
    if buffer is not None:
        buffer.setTarget(file)
        buffer.flush()
        log.removeHandler(buffer)
        buffer.close()
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
