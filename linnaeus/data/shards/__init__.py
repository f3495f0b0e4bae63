"""WebDataset tar shards: ``linnaeus shard`` (writer), training from shards (reader), ``shard_report`` (check).

Names are imported lazily so the writer (and ``linnaeus shard``) never imports torch.
"""

from __future__ import annotations

from linnaeus.utils.lazy import lazy_exports

_EXPORTS = {
    "FORMAT_VERSION": "linnaeus.data.shards.manifest",
    "MANIFEST_NAME": "linnaeus.data.shards.manifest",
    "read_manifest": "linnaeus.data.shards.manifest",
    "ShardOptions": "linnaeus.data.shards.writer",
    "write_shards": "linnaeus.data.shards.writer",
    "merge_parts": "linnaeus.data.shards.writer",
    "ShardTrainDataset": "linnaeus.data.shards.reader",
    "build_shard_batches": "linnaeus.data.shards.reader",
    "iter_shard": "linnaeus.data.shards.reader",
    "shard_report": "linnaeus.data.shards.report",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports("linnaeus.data.shards", _EXPORTS)
