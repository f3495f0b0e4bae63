"""The whole run, resolved: one spec per concern."""

from __future__ import annotations

from dataclasses import dataclass

from linnaeus.specs.data import DataSpec
from linnaeus.specs.engine import EngineSpec
from linnaeus.specs.model import AugSpec, LossSpec, ModelSpec


@dataclass(frozen=True)
class RunSpec:
    data: DataSpec
    model: ModelSpec
    loss: LossSpec
    aug: AugSpec
    engine: EngineSpec
