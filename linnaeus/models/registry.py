"""Backbones and classification heads by name (timm-style decorators over ``linnaeus.registry``).

A new model or head is one module that decorates its class; the builder looks the name up here and the config
schema accepts it, so nothing else has to change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from linnaeus.registry import HEADS, MODELS

T = TypeVar("T")


def register_model(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a backbone buildable as ``MODEL.TYPE: <name>`` (via its ``from_spec``)."""
    return MODELS.register(name)


def register_head(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a head buildable as ``MODEL.CLASSIFICATION.HEADS.<task>.TYPE: <name>``."""
    return HEADS.register(name)


def list_models() -> list[str]:
    return MODELS.names()


def list_heads() -> list[str]:
    return HEADS.names()


def get_model_class(name: str) -> type:
    return MODELS.get(name, "MODEL.TYPE")


def get_head_class(name: str, key: str) -> type:
    return HEADS.get(name, key)
