"""Non-finite losses and gradients: a run stops at the step they appear (or skips that step, within a bound), so it
never trains on, checkpoints or exports NaN weights and never exits 0 after diverging.

Cost: the flags of a window's micro-batches are gathered on the device; at the optimizer step they are all-reduced
(max) once and read on the host once, so every process takes the same decision at the same step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from linnaeus.errors import ConfigError, LinnaeusError

log = logging.getLogger("linnaeus")


class NonFiniteError(LinnaeusError):
    """The run produced a non-finite loss or gradient (exit code 3: not worth requeueing as is)."""

    exit_code = 3


def step_grad_norm(
    accelerator: Any, model: Any, clip: float, uses_deepspeed: bool, precision: str
) -> torch.Tensor | float | None:
    """The step's global gradient norm, clipping to ``clip`` when it is > 0. None under fp16, whose loss scaler
    treats overflowing gradients as routine and skips those steps itself. Under DeepSpeed the engine has already
    clipped and stepped inside ``backward``, so its own norm of the step is read."""
    if precision == "fp16":
        if clip > 0 and not uses_deepspeed:
            accelerator.clip_grad_norm_(model.parameters(), clip)
        return None
    if uses_deepspeed:
        return model.get_global_grad_norm()
    if clip > 0:
        return accelerator.clip_grad_norm_(model.parameters(), clip)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


class NonFiniteGuard:
    """``add`` each micro-batch's losses (device only), then ``check`` once per optimizer step (collective)."""

    def __init__(
        self,
        task_keys: Iterable[str],
        device: torch.device,
        mode: str = "stop",
        max_skips: int = 0,
        reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
        step_applied_in_backward: bool = False,
        scaler_skips: bool = False,
    ) -> None:
        if mode == "skip" and step_applied_in_backward and not scaler_skips:
            raise ConfigError(
                "TRAIN.NONFINITE: skip is not possible under DeepSpeed in bf16/fp32 (the engine applies the step "
                "inside backward, before it can be checked); use stop"
            )
        self.names = [f"{k} loss" for k in task_keys] + ["total loss", "gradients"]
        self.device = device
        self.mode = mode
        self.max_skips = max_skips
        self.reduce_max = reduce_max
        self.scaler_skips = scaler_skips
        self.skipped = 0
        self._flags = torch.zeros(len(self.names), device=device)

    def add(self, total: torch.Tensor, per_task: dict[str, torch.Tensor]) -> None:
        losses = torch.stack([*(v.detach().float() for v in per_task.values()), total.detach().float()])
        self._flags[:-1] = torch.maximum(self._flags[:-1], (~torch.isfinite(losses)).float())

    def check(self, step: int, grad_norm: torch.Tensor | float | None) -> bool:
        """Collective. Raises ``NonFiniteError`` to stop; True: skip this step (the caller drops its gradients so
        the optimizer applies nothing); False: apply it."""
        flags, self._flags = self._flags, torch.zeros_like(self._flags)
        if grad_norm is not None:
            flags[-1] = (~torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32, device=self.device))).float()
        if self.reduce_max is not None:
            flags = self.reduce_max(flags)
        bad = [name for name, flag in zip(self.names, flags.tolist(), strict=True) if flag > 0]  # the host sync
        if not bad:
            return False
        what = bad[0] + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        if self.mode == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            log.warning(
                "step %d: non-finite %s; step skipped (%d of at most %d, TRAIN.NONFINITE_MAX_SKIPS)",
                step + 1,
                what,
                self.skipped,
                self.max_skips,
            )
            return not self.scaler_skips  # fp16: the loss scaler sees the same overflow and skips the step itself
        bound = f" after {self.skipped} skipped steps (TRAIN.NONFINITE_MAX_SKIPS {self.max_skips})"
        raise NonFiniteError(
            f"training stopped at step {step + 1}: non-finite {what}"
            + (bound if self.mode == "skip" else "")
            + "; nothing from this step was saved or exported (lower LR_SCHEDULER.BASE_LR, run `linnaeus check` for "
            "out-of-range metadata, or set TRAIN.NONFINITE skip)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_skipped_steps": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("nonfinite_skipped_steps", 0))
