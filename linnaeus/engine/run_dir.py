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

from linnaeus.errors import ConfigError
from linnaeus.utils.io import atomic_write_json

log = logging.getLogger("linnaeus")


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
