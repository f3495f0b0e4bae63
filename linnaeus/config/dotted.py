"""Dotted keys (``DATA.META.COMPONENTS``) in a plain nested-dict config tree, as read from YAML."""

from __future__ import annotations

from typing import Any

_MISSING = object()


def _lookup(tree: dict, dotted: str) -> Any:
    """The value at ``dotted``, or ``_MISSING`` where the path does not exist."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def has_dotted(tree: dict, dotted: str) -> bool:
    return _lookup(tree, dotted) is not _MISSING


def get_dotted(tree: dict, dotted: str) -> Any:
    """The value at ``dotted``, or None where the path does not exist."""
    value = _lookup(tree, dotted)
    return None if value is _MISSING else value


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set ``dotted`` to ``value``, creating (or replacing non-dict values with) the sections on the way."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
