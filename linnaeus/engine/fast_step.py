"""The fast training step: ``torch.compile``, channels_last memory format and fused AdamW.

Each is a setting that takes ``auto`` (the default), ``true`` or ``false``:

- ``MODEL.COMPILE`` (auto: on CUDA; on the CPU inductor spends minutes compiling for little gain): the model's
  ``forward`` is compiled in place (``dynamic=False``: inductor's dynamic-shape path crashes on this model; each new
  input shape compiles once). The module, its parameter names and its checkpoints stay exactly those of the eager
  model. If compiling fails, the run warns once and continues eagerly.
- ``MODEL.CHANNELS_LAST`` (auto: on CUDA): the image batch, and the convolution weights, in NHWC, the layout
  cuDNN's bf16 convolutions (the ConvNeXt stages) run fastest in. Under DeepSpeed only the images: ZeRO keeps the
  parameters as views into its flat contiguous buffers (it refuses channels_last weights), and a convolution whose
  input is channels_last runs channels_last anyway.
- ``OPTIMIZER.FUSED`` (auto: on wherever PyTorch has the kernel, CUDA and CPU): ``torch.optim.AdamW(fused=True)``,
  one kernel for the whole update instead of a loop over parameters (about 3x faster on the CPU too); also what
  DeepSpeed's ZeRO optimizer runs on its fp32 partitions, since it wraps ours. Same update up to float rounding,
  same state layout (a resume may switch it).

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

from linnaeus.specs.engine import SpeedupSpec

log = logging.getLogger("linnaeus")


FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # device types with a fused AdamW kernel in the supported torch versions


def resolve_auto(value: bool | str, auto: bool) -> bool:
    """A ``true | false | auto`` setting → bool (``auto`` → ``auto``, the setting's own rule for this device)."""
    return auto if value == "auto" else bool(value)


@dataclass(frozen=True)
class StepSpeedups:
    compile: bool
    channels_last: bool
    fused_optimizer: bool

    channels_last_weights: bool = False  # also the parameters (not under DeepSpeed)

    @classmethod
    def resolve(cls, spec: SpeedupSpec, device: torch.device, uses_deepspeed: bool = False) -> StepSpeedups:
        kind = torch.device(device).type
        channels_last = resolve_auto(spec.channels_last, kind == "cuda")
        return cls(
            compile=resolve_auto(spec.compile, kind == "cuda"),
            channels_last=channels_last,
            fused_optimizer=resolve_auto(spec.fused_optimizer, kind in FUSED_ADAMW_DEVICES),
            channels_last_weights=channels_last and not uses_deepspeed,
        )

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def summary(self) -> str:
        layout = "channels_last" if self.channels_last_weights else "channels_last (images; DeepSpeed keeps weights)"
        on = [name for name, flag in (("torch.compile", self.compile), (layout, self.channels_last),
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
