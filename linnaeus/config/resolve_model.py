"""Config → ``ModelSpec`` / ``LossSpec`` / ``AugSpec``: the one place those layers' keys are read."""

from __future__ import annotations

from linnaeus.config.defaults import Config
from linnaeus.specs.model import AugSpec, LossSpec, ModelSpec


def model_spec(cfg: Config) -> ModelSpec:
    return ModelSpec()


def loss_spec(cfg: Config) -> LossSpec:
    return LossSpec()


def aug_spec(cfg: Config) -> AugSpec:
    return AugSpec()
