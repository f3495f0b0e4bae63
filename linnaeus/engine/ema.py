"""EMA of the weights (``TRAIN.EMA``) on timm's ModelEmaV3, with the update counter kept for exact resume.

The loop calls::

    ema = EmaComponent.maybe_create(spec, model, device=accelerator.device)  # spec: EmaSpec; before prepare
    ema.update(model, step)                          # after each optimizer step (after the sync point)
    ema.module                                       # the averaged LinnaeusModel, eval mode, for `val_ema`
    ema.save(path) / ema.load(path)                  # <checkpoint>/ema.safetensors, counter in its metadata
    ema.state_dict() / ema.load_state_dict(sd)       # the same, in memory

The EMA copy is a plain module on every rank, in fp32, on the model's device (so `val_ema` runs at full speed).
Under ZeRO-3 each rank's parameters are shards; ``update`` gathers them (DeepSpeed's ``GatheredParameters``,
read-only) for the duration of one update, so every rank's EMA sees the whole model and all ranks stay identical.
The cost is one full fp32 copy per rank: a model too large for that needs ``device='cpu'`` (slower update).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linnaeus.errors import ConfigError
from linnaeus.models.param_groups import unwrap
from linnaeus.specs.engine import EmaSpec
from linnaeus.utils.io import atomic_save_safetensors

EMA_FILE = "ema.safetensors"


def _gathered(model: nn.Module) -> contextlib.AbstractContextManager:
    """Full parameters for the duration of the block: a no-op unless ZeRO-3 partitioned them."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class EmaComponent:
    """One EMA of a LinnaeusModel: decay schedule from timm, counter and file format ours."""

    def __init__(
        self, model: nn.Module, decay: float, warmup: bool = True, device: torch.device | str | None = None
    ) -> None:
        from timm.utils import ModelEmaV3

        inner = unwrap(model)
        with _gathered(inner):
            # fp32 always: a bf16 EMA cannot hold (1 - decay)·Δ at typical decays.
            self.ema = ModelEmaV3(inner, decay=decay, use_warmup=warmup, device=device, dtype=torch.float32)
        self.ema.module.requires_grad_(False)
        self.updates = 0  # EMA updates so far: drives the warmup, saved for exact resume
        self.step = 0  # the optimizer step of the last update

    @classmethod
    def maybe_create(
        cls, spec: EmaSpec, model: nn.Module, device: torch.device | str | None = None
    ) -> EmaComponent | None:
        """The EMA of ``model`` when ``spec.enabled`` (``TRAIN.EMA``), else None. Create it before
        ``accelerator.prepare`` (the model is still a plain module with whole parameters) and give the device
        training will run on."""
        return cls(model, spec.decay, spec.warmup, device=device) if spec.enabled else None

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def decay_at(self, updates: int) -> float:
        """The decay the ``updates``-th update uses (the first one copies the model)."""
        return float(self.ema.get_decay(updates))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Move the average toward ``model`` after optimizer step ``step``; returns the decay used."""
        self.updates += 1
        self.step = int(step)
        decay = self.decay_at(self.updates)
        inner = unwrap(model)
        # timm's multi-tensor lerp needs both copies on one device (not so while the model is still on the CPU).
        self.ema.foreach = next(inner.parameters()).device == next(self.module.parameters()).device
        with _gathered(inner):
            self.ema.apply_update_(inner, decay)
        self.module.eval()
        return decay

    # ------------------------------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "step": self.step}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing, unexpected = self.module.load_state_dict(state["module"], strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"EMA weights do not match the model (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
            )
        self.updates = int(state["updates"])
        self.step = int(state["step"])

    def save(self, path: str | os.PathLike) -> Path:
        """EMA weights as safetensors (names as the bare model's, usable as export weights), counter in metadata."""
        meta = {"ema_updates": str(self.updates), "ema_step": str(self.step)}
        return atomic_save_safetensors(self.module.state_dict(), Path(path), meta)

    def load(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no EMA weights to resume from (TRAIN.EMA.ENABLED changed between runs?)")
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if "ema_updates" not in meta:
            raise ConfigError(f"{path}: not an EMA file (no ema_updates in its metadata)")
        device = next(self.module.parameters()).device
        self.load_state_dict(
            {
                "module": load_file(str(path), device=str(device)),
                "updates": meta["ema_updates"],
                "step": meta.get("ema_step", 0),
            }
        )
