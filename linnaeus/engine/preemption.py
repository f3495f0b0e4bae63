"""Preemption: SIGTERM/SIGINT set a flag; the processes agree on it every few optimizer steps, then stop together.

A process alone reads its own flag (no device work at all). Several processes all-reduce their flags every
``every`` steps and read the result one step later through a ``HostReadback``, so agreeing never stalls the GPU;
every process reads the same value at the same step and stops there.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import torch

from linnaeus.engine.readback import HostReadback

PREEMPT_CHECK_STEPS = 5


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
        self.raised = False
        self._pending: HostReadback | None = None  # the agreement posted at the last check step
        self.signal_name = ""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        self.raised = True
        self.signal_name = signal.Signals(signum).name

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
