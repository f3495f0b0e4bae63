"""``BatchStream``: the one contract between the trainer and whatever feeds it training batches (see
``linnaeus.data.stream`` for the builders). Files and shards both wrap their DataLoader in it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from torch.utils.data import DataLoader


class EpochPosition(Protocol):
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...


class BatchStream:
    def __init__(self, loader: DataLoader, position: EpochPosition, batches_per_epoch: int) -> None:
        self.loader = loader
        self.position = position
        self.batches_per_epoch = int(batches_per_epoch)
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.position.set_epoch(epoch, start_batch=start_batch)
        self.start_batch = int(start_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.loader)

    @property
    def skipped_samples(self) -> int:
        return int(getattr(self.position, "skipped_count", 0))
