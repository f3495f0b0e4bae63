"""Preemption: a stop signal sets a flag; the processes agree on it every few optimizer steps, then stop together.

Stop signals are every one a cluster or a terminal sends to end a job: SIGTERM (SLURM's warning, ``kill``), SIGINT
(Ctrl-C), SIGHUP (a closed terminal or ssh session) and SIGUSR1/SIGUSR2 (``--signal=USR1@120``). From process start
(``install_stop_handlers``) until the training loop begins, a stop signal raises ``StoppedDuringSetup`` (nothing new to
checkpoint: the command exits 75 and releases the run lock on its way out); from then on it sets the flag.

A process alone reads its own flag (no device work at all). Several processes all-reduce their flags every
``every`` steps and read the result one step later through a ``HostReadback``, so agreeing never stalls the GPU;
every process reads the same value at the same step and stops there.

A rank started by a launcher (torchrun, ``accelerate launch``) whose launcher is gone (SIGKILLed, OOM-killed) is
unsupervised: ``watch_launcher`` sends it SIGTERM, so it checkpoints and exits 75 as if preempted.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import torch

from linnaeus.engine.readback import HostReadback
from linnaeus.errors import PREEMPTED_EXIT_CODE
from linnaeus.utils.signals import STOP_SIGNALS

log = logging.getLogger("linnaeus")

PREEMPT_CHECK_STEPS = 5
# A rank whose launcher is gone gets this long to checkpoint after its SIGTERM before it ends itself (a rank stuck in
# a collective with a peer that died would otherwise never exit).
ORPHAN_GRACE_ENV = "LINNAEUS_ORPHAN_GRACE_S"
ORPHAN_GRACE_S = 100.0


class StoppedDuringSetup(BaseException):  # not an error: a stop request, like KeyboardInterrupt
    """A stop signal before the training loop began. A BaseException so no ``except Exception`` swallows it."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class _StopState:
    raise_on_signal = False
    received = ""  # the name of the last stop signal received, "" for none


_state = _StopState()


def _handler(signum: int, frame: object) -> None:
    _state.received = signal.Signals(signum).name
    if _state.raise_on_signal:
        _state.raise_on_signal = False  # once: the unwinding itself must not be interrupted again
        raise StoppedDuringSetup(_state.received)


def install_stop_handlers() -> None:
    """Until a ``Preemption`` is built, a stop signal raises ``StoppedDuringSetup`` in the main thread."""
    _state.raise_on_signal = True
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


def stop_signal_received() -> str:
    """The name of the last stop signal this process received ("" for none)."""
    return _state.received


class Preemption:
    """Installs the signal handlers when built. ``reduce_max`` all-reduces a tensor with max (None when alone)."""

    def __init__(
        self,
        device: torch.device,
        reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
        every: int = PREEMPT_CHECK_STEPS,
    ) -> None:
        self.device = device
        self.reduce_max = reduce_max
        self.every = every
        self._pending: HostReadback | None = None  # the agreement posted at the last check step
        _state.raise_on_signal = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, _handler)

    @property
    def raised(self) -> bool:
        return bool(_state.received)

    @property
    def signal_name(self) -> str:
        return _state.received

    def agreed(self, step: int) -> bool:
        """Collective on the steps it checks (every ``every`` steps, the same steps everywhere); True on every
        process at the same step once any process was signalled. SLURM's warning comes minutes ahead, so a few
        steps' delay is harmless."""
        if self.reduce_max is None:
            return self.raised
        decision = False
        if self._pending is not None:  # posted a step ago: its all-reduce and copy have finished by now
            decision = self._pending.values()[0] > 0
            self._pending = None
        if not decision and step % self.every == 0:
            flag = torch.tensor([1.0 if self.raised else 0.0], device=self.device)
            self._pending = HostReadback(self.reduce_max(flag))
        return decision


def started_by_launcher() -> bool:
    """True in a process torchrun / ``accelerate launch`` started (not a trainer run from a shell, which may
    outlive its shell on purpose, e.g. under nohup)."""
    return any(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "ACCELERATE_DYNAMO_BACKEND"))


def watch_launcher(poll_s: float = 1.0) -> None:
    """In a launched rank: when the launcher that started this process is gone, SIGTERM to this process (the
    preemption path: checkpoint, exit 75); if it has not exited ``LINNAEUS_ORPHAN_GRACE_S`` seconds later, exit 75."""
    if not started_by_launcher():
        return
    launcher = os.getppid()
    grace = float(os.environ.get(ORPHAN_GRACE_ENV, ORPHAN_GRACE_S))

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        _say(f"linnaeus: the launcher (pid {launcher}) is gone; stopping as on SIGTERM (checkpoint, exit 75)")
        time.sleep(grace)  # the main thread may be stuck in C++ (a collective, a rendezvous) and never see the flag
        _say(f"linnaeus: still running {grace:.0f} s after the launcher was gone; exit {PREEMPTED_EXIT_CODE}")
        os._exit(PREEMPTED_EXIT_CODE)

    threading.Thread(target=watch, name="linnaeus-launcher-watch", daemon=True).start()


def _say(message: str) -> None:
    # stderr was often a pipe to the launcher that is gone: a broken pipe must not end the watch before its exit.
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass
