"""WebDataset tar shards: ``linnaeus shard`` (writer), training from shards (reader), ``shard_report`` (check).

Names are imported lazily so the writer (and ``linnaeus shard``) never imports torch.
"""

from __future__ import annotations

from linnaeus.utils.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "manifest": ["FORMAT_VERSION", "MANIFEST_NAME", "read_manifest"],
        "writer": ["ShardOptions", "write_shards", "merge_parts"],
        "reader": ["ShardTrainDataset", "build_shard_batches", "iter_shard"],
        "report": ["shard_report"],
    },
)
