"""Name → builder registries for backbones and classification heads (timm-style decorators).

A new model or head is added by writing one module that decorates its class; the builder looks the
name up here, so nothing else has to change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from linnaeus.errors import ConfigError

T = TypeVar("T")

_MODELS: dict[str, type] = {}
_HEADS: dict[str, type] = {}


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[type[T]], type[T]]:
    def decorator(cls: type[T]) -> type[T]:
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} '{name}' is already registered to {table[name].__qualname__}")
        table[name] = cls
        return cls

    return decorator


def register_model(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a backbone buildable as ``MODEL.TYPE: <name>``."""
    return _register(_MODELS, "model", name)


def register_head(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a head buildable as ``MODEL.CLASSIFICATION.HEADS.<task>.TYPE: <name>``."""
    return _register(_HEADS, "head", name)


def list_models() -> list[str]:
    return sorted(_MODELS)


def list_heads() -> list[str]:
    return sorted(_HEADS)


def get_model_class(name: str) -> type:
    if name not in _MODELS:
        raise ConfigError(f"MODEL.TYPE: unknown model '{name}'; expected one of {list_models()}")
    return _MODELS[name]


def get_head_class(name: str, key: str) -> type:
    if name not in _HEADS:
        raise ConfigError(f"{key}: unknown head type '{name}'; expected one of {list_heads()}")
    return _HEADS[name]
