"""What the model, loss and augmentation layers read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """Everything ``linnaeus.models`` needs from the config (filled by ``linnaeus.config.resolve_model``)."""


@dataclass(frozen=True)
class LossSpec:
    """Everything ``linnaeus.losses`` needs from the config."""


@dataclass(frozen=True)
class AugSpec:
    """Everything ``linnaeus.aug`` needs from the config."""
