"""What the engine's components read: the loop, checkpoints, EMA, freezing, tracking, schedules."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSpec:
    """Everything ``linnaeus.engine``'s components need (filled by ``linnaeus.config.resolve_engine``)."""
