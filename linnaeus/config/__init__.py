"""Typed configuration: defaults (``defaults.py``), YAML + BASE + --opts loading, consistency checks."""

from linnaeus.config.defaults import Config, default_config
from linnaeus.config.loader import (
    config_to_dict,
    dump_config,
    load_config,
    load_config_with_provenance,
    repo_root,
    save_config,
)

__all__ = [
    "Config",
    "config_to_dict",
    "default_config",
    "dump_config",
    "load_config",
    "load_config_with_provenance",
    "repo_root",
    "save_config",
]
