"""``BatchStream``: one process's training batches, epoch by epoch, whatever they are read from (files or shards).

The trainer only ever sees this contract::

    stream.set_epoch(epoch, start_batch=k)   # position: epoch e, after k batches already consumed (resume)
    len(stream)                              # batches left in this epoch on this process
    for batch in stream: ...                 # exactly len(stream) batches, the same count on every process
    stream.batches_per_epoch                 # whole-epoch count (same on every process)
    stream.skipped_samples                   # corrupt samples skipped so far by this process and its workers

Batches are dicts in the format of docs/design.md ("Batches"). File-backed and shard-backed streams differ only in
what moves them to an epoch position: an ``EpochSampler`` or a ``ShardTrainDataset``, both with
``set_epoch(epoch, start_batch)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from linnaeus.data.batch_stream import BatchStream, EpochPosition
from linnaeus.data.loader import build_loader, loader_num_batches

__all__ = ["BatchStream", "EpochPosition", "build_file_batches", "build_train_batches"]

if TYPE_CHECKING:
    from linnaeus.data.prepare import PreparedData
    from linnaeus.specs.data import DataSpec


def build_file_batches(
    dataset: Any,
    *,
    batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
    num_workers: int,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    multiprocessing_context: Any = None,
) -> BatchStream:
    """Shuffled training batches over a map-style dataset; the tail that cannot fill every process is dropped."""
    loader, sampler = build_loader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=True,
        seed=seed,
        num_replicas=world_size,
        rank=rank,
        drop_last=True,
        pad=False,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        multiprocessing_context=multiprocessing_context,
    )
    batches = loader_num_batches(len(dataset), batch_size=batch_size, num_replicas=world_size, drop_last=True)
    return BatchStream(loader, sampler, batches)


def build_train_batches(
    spec: DataSpec, data: PreparedData, *, world_size: int, rank: int, pin_memory: bool = False, decode: str = "cpu"
) -> BatchStream:
    """The training stream ``spec`` asks for: shards when ``DATA.SHARDS.ENABLED``, else the image files.

    ``decode``: where images are decoded (``device_decode.resolve_decode_mode``): ``"device"`` batches carry
    encoded images for ``linnaeus.data.device_decode``, ``"worker"`` ones were decoded by it in the workers."""
    common: dict[str, Any] = dict(
        world_size=world_size,
        rank=rank,
        batch_size=spec.loader.batch_size,
        seed=spec.seed,
        num_workers=spec.loader.num_workers,
        pin_memory=pin_memory,
        prefetch_factor=spec.loader.prefetch_factor,
    )
    if spec.shards.enabled:
        from linnaeus.data.shards.reader import build_shard_batches

        return build_shard_batches(spec, data, decode=decode, **common)
    return build_file_batches(data.dataset("train", train=True, decode=decode), **common)
