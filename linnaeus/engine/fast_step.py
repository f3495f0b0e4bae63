"""The fast training step on CUDA: ``torch.compile``, channels_last memory format and fused AdamW.

Each is a setting that takes ``auto`` (the default: on when the run trains on CUDA, off on the CPU, where inductor
spends minutes compiling for little gain and the other two buy nothing), ``true`` or ``false``:

- ``MODEL.COMPILE``: the model's ``forward`` is compiled in place (``dynamic=False``: inductor's dynamic-shape
  path crashes on this model; each new input shape compiles once). The module, its parameter names and its
  checkpoints stay exactly those of the eager model. If compiling fails, the run warns once and continues eagerly.
- ``MODEL.CHANNELS_LAST``: convolution weights and the image batch in NHWC, the layout cuDNN's bf16 convolutions
  (the ConvNeXt stages) run fastest in.
- ``OPTIMIZER.FUSED``: ``torch.optim.AdamW(fused=True)``, one kernel for the whole update instead of a few per
  parameter group (also when DeepSpeed wraps the optimizer, which then runs it on its fp32 partitions).

``benchmarks/gpu_train.py`` measures each of them against its absence on a GPU.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger("linnaeus")


def resolve_auto(value: bool | str, on_cuda: bool) -> bool:
    """A ``true | false | auto`` setting → bool (``auto``: on when training on CUDA)."""
    return on_cuda if value == "auto" else bool(value)


@dataclass(frozen=True)
class StepSpeedups:
    compile: bool
    channels_last: bool
    fused_optimizer: bool

    @classmethod
    def resolve(cls, cfg: Any, device: torch.device) -> StepSpeedups:
        on_cuda = torch.device(device).type == "cuda"
        return cls(
            compile=resolve_auto(cfg.MODEL.COMPILE, on_cuda),
            channels_last=resolve_auto(cfg.MODEL.CHANNELS_LAST, on_cuda),
            fused_optimizer=resolve_auto(cfg.OPTIMIZER.FUSED, on_cuda),
        )

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def summary(self) -> str:
        on = [name for name, flag in (("torch.compile", self.compile), ("channels_last", self.channels_last),
                                      ("fused AdamW", self.fused_optimizer)) if flag]  # fmt: skip
        return ", ".join(on) or "none (eager, contiguous, foreach AdamW)"


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "compiling failed", as opposed to errors of the model or the data."""
    from torch._dynamo.exc import TorchDynamoException  # BackendCompilerFailed, Unsupported, ...

    errors: list[type[BaseException]] = [TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError  # torch >= 2.8 wraps inductor failures in this

        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)


class CompiledForward:
    """``module.forward`` compiled, falling back to the eager forward for good (one warning) when a compile fails.

    Compilation happens on a call with a new input shape (the first training step, the first validation batch), so
    that is where a failure appears; a failing compile raises before the compiled graph runs, and the same call
    is then repeated eagerly.
    """

    def __init__(self, eager: Callable[..., Any], compiled: Callable[..., Any] | None) -> None:
        self.eager = eager
        self.compiled: Callable[..., Any] | None = compiled
        self._errors = _compile_errors()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except self._errors as err:
            self.compiled = None
            reason = " ".join(str(err).split()) or type(err).__name__
            log.warning(
                "torch.compile failed (%s: %s); training continues without compilation (MODEL.COMPILE false "
                "skips the attempt)",
                type(err).__name__,
                reason[:300],
            )
        return self.eager(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # A copied module (an EMA copy, a benchmark's baseline) gets the eager forward of the copy, not compiled code.
        return copy.deepcopy(self.eager, memo)


def compile_forward(module: nn.Module, **compile_kwargs: Any) -> CompiledForward:
    """Compile ``module.forward`` in place (``dynamic=False`` unless given); see ``CompiledForward``."""
    eager = module.forward
    compile_kwargs.setdefault("dynamic", False)
    compiled: Callable[..., Any] | None
    try:
        compiled = torch.compile(eager, **compile_kwargs)
    except RuntimeError as err:  # torch.compile unavailable on this platform or Python version: run eagerly
        log.warning("torch.compile is not available (%s); training continues without compilation", err)
        compiled = None
    wrapper = CompiledForward(eager, compiled)
    module.forward = wrapper  # type: ignore[method-assign]
    return wrapper


def adamw(groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float], eps: float, fused: bool) -> Any:
    """The run's AdamW; ``fused`` needs every parameter on one device type that has a fused kernel (CUDA, CPU)."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
