"""Preemption: SIGTERM/SIGINT set a flag; the processes agree on it every few optimizer steps, then stop together."""

from __future__ import annotations

import signal
from collections.abc import Callable

import torch

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
        self.signal_name = ""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        self.raised = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self, step: int) -> bool:
        """Collective on the steps it checks. Agreeing costs an all-reduce and a host sync, so the processes compare
        flags only every ``every`` steps (the same steps everywhere); SLURM's warning comes minutes ahead, so a few
        steps' delay is harmless."""
        if step % self.every != 0:
            return False
        flag = torch.tensor([1.0 if self.raised else 0.0], device=self.device)
        if self.reduce_max is not None:
            flag = self.reduce_max(flag)
        return bool(flag.item() > 0)
