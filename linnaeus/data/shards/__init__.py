"""WebDataset tar shards: ``linnaeus shard`` (writer), training from shards (reader), ``shard_report`` (check).

Names are imported lazily so the writer (and ``linnaeus shard``) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FORMAT_VERSION": "linnaeus.data.shards.manifest",
    "MANIFEST_NAME": "linnaeus.data.shards.manifest",
    "read_manifest": "linnaeus.data.shards.manifest",
    "ShardOptions": "linnaeus.data.shards.writer",
    "write_shards": "linnaeus.data.shards.writer",
    "ShardTrainDataset": "linnaeus.data.shards.reader",
    "build_shard_train_loader": "linnaeus.data.shards.reader",
    "iter_shard": "linnaeus.data.shards.reader",
    "shard_report": "linnaeus.data.shards.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'linnaeus.data.shards' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
