"""The signals that ask a job to stop, and process liveness, shared by the trainer and its loader workers."""

from __future__ import annotations

import os
import signal
from pathlib import Path

# Every signal a cluster or a terminal sends to end a job: SIGTERM (SLURM's warning, `kill`), SIGINT (Ctrl-C),
# SIGHUP (a closed terminal or ssh session), SIGUSR1/SIGUSR2 (`--signal=USR1@120`).
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: kill(0) is all we know
    return state not in ("Z", "X")
