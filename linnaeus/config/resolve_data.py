"""Config → ``DataSpec``: the one place the data layer's keys are read."""

from __future__ import annotations

from linnaeus.config.defaults import Config
from linnaeus.specs.data import DataSpec


def data_spec(cfg: Config) -> DataSpec:
    return DataSpec()
