"""Name → class tables for the parts a config names: models, heads and losses.

This module sits at the bottom of the package (it imports nothing from Linnaeus but the errors) so that the config
schema can check ``MODEL.TYPE`` and friends against these tables while ``linnaeus.models`` and ``linnaeus.losses``
register into them. A table fills itself on first lookup by importing the package that holds the built-in entries
(named as a string, so importing the config never imports torch); a user's own entry is registered by importing
the user's module before the config is loaded.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from linnaeus.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """One table: ``@REG.register("Name")`` on a class, ``REG.get("Name", key)`` to look it up."""

    def __init__(self, kind: str, builtins: str) -> None:
        self.kind = kind
        self._builtins = builtins
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that makes ``obj`` available as ``name``; a second, different object under one name is a bug."""

        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is already registered to {self._entries[name]!r}")
            self._entries[name] = obj
            return obj

        return decorator

    def _load_builtins(self) -> None:
        # Importing a partly imported module returns it as is, so this is safe during that package's own import.
        importlib.import_module(self._builtins)

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def _alternatives(self, name: str) -> str | None:
        """``None`` when ``name`` is registered, else the nearest registered name and all of them."""
        if name in self._entries:
            return None
        names = self.names()
        if name in self._entries:
            return None
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{hint}expected one of {names}"

    def get(self, name: str, key: str) -> T:
        """The entry for ``name``; a one-line ``ConfigError`` naming ``key`` and the registered names if none."""
        alternatives = self._alternatives(name)
        if alternatives is not None:
            raise ConfigError(f"{key}: unknown {self.kind} '{name}'; {alternatives}")
        return self._entries[name]

    def validator(self) -> Callable[[str], str]:
        """A pydantic ``AfterValidator`` body: accept a registered name (the config loader adds key and value)."""

        def check(name: str) -> str:
            alternatives = self._alternatives(name)
            if alternatives is not None:
                raise ValueError(f"unknown {self.kind}; {alternatives}")
            return name

        return check


MODELS: Registry[type] = Registry("model", "linnaeus.models")
HEADS: Registry[type] = Registry("head type", "linnaeus.models")
LOSSES: Registry[type] = Registry("loss", "linnaeus.losses")
