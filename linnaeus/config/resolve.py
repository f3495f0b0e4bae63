"""Read the config once: ``resolve(cfg) -> (RunSpec, problems)``.

Each layer's keys are read in one module (``resolve_data``, ``resolve_model``, ``resolve_engine``); every rule that
relates keys of different sections lives here, so ``linnaeus config validate`` lists all of them before any file is
read.
"""

from __future__ import annotations

from linnaeus.config.defaults import Config
from linnaeus.config.resolve_data import data_spec
from linnaeus.config.resolve_engine import engine_spec
from linnaeus.config.resolve_model import aug_spec, loss_spec, model_spec
from linnaeus.specs import RunSpec


def resolve(cfg: Config) -> tuple[RunSpec, list[str]]:
    """The run's specs and every cross-key problem (one line each; empty when the config is consistent)."""
    problems: list[str] = []
    spec = RunSpec(
        data=data_spec(cfg),
        model=model_spec(cfg),
        loss=loss_spec(cfg),
        aug=aug_spec(cfg),
        engine=engine_spec(cfg),
    )
    return spec, problems
