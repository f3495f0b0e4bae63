"""Config → ``EngineSpec``: the one place the engine components' keys are read."""

from __future__ import annotations

from linnaeus.config.defaults import Config
from linnaeus.specs.engine import EngineSpec


def engine_spec(cfg: Config) -> EngineSpec:
    return EngineSpec()
