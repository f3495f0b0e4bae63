"""The run folder, human-readable logs and ``metrics.jsonl``. Both logs are appended across restarts, never truncated."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from linnaeus.config import Config
from linnaeus.errors import ConfigError
from linnaeus.utils.io import atomic_write_json

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


class RunLock:
    """``<run>/run.lock``: which process trains into this folder (host, pid, heartbeat refreshed by a thread).

    Taken by the main process at setup and removed at exit. A second run into a busy folder is refused with one line
    naming the holder. A lock is stale, and taken over with a warning, when its process is gone (same host: the pid
    no longer exists) or its heartbeat is older than ``STALE_AFTER_S`` (another host, which we cannot ask).
    """

    FILE = "run.lock"
    HEARTBEAT_S = 30.0
    STALE_AFTER_S = 600.0

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path = path
        self.record = record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="linnaeus-run-lock", daemon=True)

    @classmethod
    def acquire(cls, run: Path) -> RunLock:
        path = Path(run) / cls.FILE
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "heartbeat": time.time()}
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = cls._read(path)
            mine = holder.get("pid") == os.getpid() and holder.get("host") == record["host"]
            why_stale = "an earlier run in this process" if mine else cls._stale_reason(holder)
            if why_stale is None:
                age = time.time() - float(holder.get("heartbeat", 0))
                raise ConfigError(
                    f"{run}: in use by pid {holder.get('pid')} on {holder.get('host')} (heartbeat {age:.0f} s ago, "
                    f"{path}); wait for that run to end, stop it, or choose another EXPERIMENT.NAME"
                ) from None
            if not mine:
                log.warning("%s: taking over a stale lock (%s)", path, why_stale)
            atomic_write_json(path, record)
        else:
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
        # The folder is ours now: temporary files of atomic writes a kill interrupted belong to nobody.
        for stale in Path(run).glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        lock = cls(path, record)
        lock._thread.start()
        atexit.register(lock.release)
        return lock

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}  # half-written or garbage: treated as stale below (no pid, no heartbeat)
        return doc if isinstance(doc, dict) else {}

    @classmethod
    def _stale_reason(cls, holder: dict[str, Any]) -> str | None:
        pid, host = holder.get("pid"), holder.get("host")
        if not isinstance(pid, int) or not isinstance(host, str):
            return "unreadable lock file"
        if host == socket.gethostname():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"pid {pid} on this host no longer exists"
            except PermissionError:
                pass  # exists, owned by someone else
            return None
        age = time.time() - float(holder.get("heartbeat", 0) or 0)
        if age > cls.STALE_AFTER_S:
            return f"pid {pid} on {host} has not refreshed its heartbeat for {age:.0f} s"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            self.record["heartbeat"] = time.time()
            try:
                atomic_write_json(self.path, self.record)
            except OSError as err:  # a full disk must not kill training; the next beat retries
                log.warning("%s: cannot refresh the heartbeat (%s)", self.path, err)

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if (
            self._read(self.path).get("pid") == self.record["pid"]
            and self._read(self.path).get("host") == self.record["host"]
        ):
            self.path.unlink(missing_ok=True)
