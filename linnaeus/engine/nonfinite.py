"""Non-finite losses and gradients: a run stops at the step they appear (or skips that step, within a bound), so it
never trains on, checkpoints or exports NaN weights and never exits 0 after diverging.

Cost: the flags of a window's micro-batches are gathered on the device; at the optimizer step they are all-reduced
(max) once, so every process takes the same decision at the same step. How they reach the host depends on the mode:

- ``stop`` (default) never waits for the GPU inside the step: step ``n``'s flags are copied to the host
  asynchronously and read at step ``n + 1``'s check, or earlier by ``settle()``, which the loop calls before anything
  leaves the process (a logged row, a validation, a checkpoint, the export). A non-finite step is therefore applied
  and one more step computed before the run stops, but the error names step ``n`` and nothing from those steps is
  logged, validated, saved or exported.
- ``skip`` must decide before the optimizer applies the step, so it reads the flags on the host at every step (one
  host sync per step: the price of skipping).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from linnaeus.engine.readback import HostReadback
from linnaeus.errors import LinnaeusError
from linnaeus.specs.engine import NonFiniteSpec

log = logging.getLogger("linnaeus")

STOP = NonFiniteSpec(mode="stop", max_skips=0)


class NonFiniteError(LinnaeusError):
    """The run produced a non-finite loss or gradient (exit code 3: not worth requeueing as is)."""

    exit_code = 3


def step_grad_norm(
    accelerator: Any, model: Any, params: list[torch.nn.Parameter], clip: float, uses_deepspeed: bool, precision: str
) -> torch.Tensor | float | None:
    """The step's global gradient norm over ``params`` (the trainable parameters), clipping to ``clip`` when it is
    > 0. None under fp16, whose loss scaler treats overflowing gradients as routine and skips those steps itself
    (accelerate's clipping unscales the gradients first). Under DeepSpeed the engine has already clipped and stepped
    inside ``backward``, so its own norm of the step is read. Otherwise torch's clipping is called directly: under
    DDP every rank holds the whole averaged gradient, and accelerate's wrapper only adds per-parameter checks (DTensor,
    XLA) that cost ~2 ms per step on small models."""
    if precision == "fp16":
        if clip > 0 and not uses_deepspeed:
            accelerator.clip_grad_norm_(params, clip)
        return None
    if uses_deepspeed:
        return model.get_global_grad_norm()
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


class NonFiniteGuard:
    """``add`` each micro-batch's losses (device only), then ``check`` once per optimizer step (collective), and
    ``settle`` before anything from the run is logged, validated or saved (see the module docstring)."""

    def __init__(
        self,
        task_keys: Iterable[str],
        device: torch.device,
        spec: NonFiniteSpec = STOP,
        reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
        scaler_skips: bool = False,
    ) -> None:
        mode, max_skips = spec.mode, spec.max_skips
        # skip where DeepSpeed steps inside backward (bf16/fp32) is refused by linnaeus.config.resolve's launch rules
        self.names = [f"{k} loss" for k in task_keys] + ["total loss", "gradients"]
        self.device = device
        self.mode = mode
        self.max_skips = max_skips
        self.reduce_max = reduce_max
        self.scaler_skips = scaler_skips
        self.skipped = 0
        self._flags = torch.zeros(len(self.names), device=device)
        self._pending: tuple[int, HostReadback] | None = None  # stop mode: the last step's flags, on their way
        self.step_dropped = False  # skip mode: the last checked step applies no update (by us or the loss scaler)

    def add(self, total: torch.Tensor, per_task: dict[str, torch.Tensor]) -> None:
        losses = torch.stack([*(v.detach().float() for v in per_task.values()), total.detach().float()])
        self._flags[:-1] = torch.maximum(self._flags[:-1], (~torch.isfinite(losses)).float())

    def check(self, step: int, grad_norm: torch.Tensor | float | None) -> bool:
        """Collective. True: skip this step (the caller drops its gradients so the optimizer applies nothing);
        False: apply it. Raises ``NonFiniteError`` to stop: in stop mode for the previous step, whose flags have
        arrived by now (this step's are read by the next ``check`` or ``settle``); in skip mode for this one."""
        flags, self._flags = self._flags, torch.zeros_like(self._flags)
        self.step_dropped = False
        if grad_norm is not None:
            flags[-1] = (~torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32, device=self.device))).float()
        if self.mode == "stop":
            self.settle()  # before the collective below: when it raises, every process raises here together
            if self.reduce_max is not None:
                flags = self.reduce_max(flags)
            self._pending = (step, HostReadback(flags))
            return False
        if self.reduce_max is not None:
            flags = self.reduce_max(flags)
        return self._decide(step, flags.tolist())  # skip mode: the host sync skipping needs

    def settle(self) -> None:
        """Stop mode: read the last checked step's flags now and raise if it was not finite (no-op when none)."""
        if self._pending is not None:
            step, readback = self._pending
            self._pending = None
            self._decide(step, readback.values())

    def _decide(self, step: int, flags: list[float]) -> bool:
        bad = [name for name, flag in zip(self.names, flags, strict=True) if flag > 0]
        if not bad:
            return False
        what = bad[0] + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        if self.mode == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            self.step_dropped = True
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
