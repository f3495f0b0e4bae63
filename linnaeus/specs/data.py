"""What the data layer reads: labels, images, crops, splits, filters, metadata components, loaders, shards."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSpec:
    """Everything ``linnaeus.data`` needs from the config (filled by ``linnaeus.config.resolve_data``)."""
