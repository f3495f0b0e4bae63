"""One sample per observation (``DATA.OBSERVATIONS.ENABLED``): up to K photos of one organism and a view mask.

A sample is an observation of the split: its rows (the split's rows with one ``observation_ids`` value, in row
order), of which up to ``VIEWS`` are read: the first K (``SELECT: first``) or K drawn without replacement from
``sample_rng(seed, epoch, index)`` (``random``; validation always takes the first K). Each view is read by the row
dataset it wraps (:class:`linnaeus.data.dataset.FileDataset`) at the row's own position, so a view's crop is the one
image training would draw for that row; with one photo per observation, observation i is row i and every batch
equals image training's.

Batch entries (``collate_samples``): ``image`` uint8 (B, K, 3, S, S) (empty slots zero), ``view_mask`` bool (B, K),
``image_ok`` bool (B, K) (empty slots True), ``view_rows`` int64 (B, K) (-1 empty), and once per observation its
first row's ``meta``, ``meta_valid``, ``targets`` and ``row`` (``linnaeus check`` warns where photos disagree).
With device decode every view is one encoded image (B*K, empty slots as zero pixels); ``DeviceDecoder`` shapes them
back to (B, K, 3, S, S).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from linnaeus.data.dataset import FileDataset, parse_key
from linnaeus.data.encoded import EncodedImage
from linnaeus.data.worker_share import ArraysToWorkers

SELECT_MODES = ("random", "first")


def group_positions(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, members): the positions of each observation (``codes`` per position), observations ordered by their
    first position and members ascending; observation j's positions are ``members[starts[j]:starts[j + 1]]``."""
    codes = np.asarray(codes, dtype=np.int64)
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")[inverse.reshape(-1)]  # obs order = first seen
    members = np.lexsort((np.arange(len(codes)), rank)).astype(np.int64)
    counts = np.bincount(rank, minlength=len(first))
    starts = np.zeros(len(first) + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    return starts, members


class ObservationDataset(ArraysToWorkers, Dataset):
    """Observations of one split over a row dataset; see the module docstring."""

    def __init__(self, rows: FileDataset, codes: np.ndarray, *, views: int, select: str = "random") -> None:
        if views < 1:
            raise ValueError(f"ObservationDataset: views must be >= 1, got {views}")
        if select not in SELECT_MODES:
            raise ValueError(f"ObservationDataset: select must be one of {SELECT_MODES}, got {select!r}")
        if len(codes) != len(rows):
            raise ValueError(f"ObservationDataset: {len(codes)} observation codes for {len(rows)} rows")
        self.rows_dataset = rows
        self.starts, self.members = group_positions(codes)
        self.views = int(views)
        self.select = select

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def decode(self) -> str:
        return self.rows_dataset.decode

    def view_positions(self, index: int, epoch: int) -> np.ndarray:
        """The row-dataset positions read for observation ``index`` in ``epoch`` (at most K)."""
        members = self.members[self.starts[index] : self.starts[index + 1]]
        if len(members) <= self.views:
            return members
        if self.select == "first" or not self.rows_dataset.train:
            return members[: self.views]
        # (seed, epoch, index) as for one image, with a suffix so the choice does not reuse a crop's stream
        rng = np.random.default_rng((self.rows_dataset.seed % 2**64, epoch % 2**64, index % 2**64, 1))
        return members[np.sort(rng.choice(len(members), self.views, replace=False))]

    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, epoch, is_pad = parse_key(key)
        if not 0 <= index < len(self):
            raise IndexError(f"ObservationDataset index {index} out of range for {len(self)} observations")
        ds, k = self.rows_dataset, self.views
        positions = self.view_positions(index, epoch)
        mask = np.zeros(k, bool)
        mask[: len(positions)] = True
        ok = np.ones(k, bool)
        view_rows = np.full(k, -1, np.int64)
        view_rows[: len(positions)] = ds.rows[positions]
        size = ds.img_size
        if ds.decode != "cpu":
            encoded = [EncodedImage.decoded(np.zeros((3, size, size), np.uint8)) for _ in range(k)]
            for j, pos in enumerate(positions):
                encoded[j], ok[j] = ds.load_encoded(int(pos), epoch)
            picture: dict[str, Any] = {"encoded_views": encoded}
        else:
            images = np.zeros((k, 3, size, size), np.uint8)
            for j, pos in enumerate(positions):
                images[j], ok[j] = ds.load(int(pos), epoch)
            picture = {"image": torch.from_numpy(images)}
        first = int(positions[0])
        return {
            **picture,
            "view_mask": torch.from_numpy(mask),
            "view_rows": torch.from_numpy(view_rows),
            "meta": torch.from_numpy(ds.meta[first].copy()),
            "meta_valid": torch.from_numpy(ds.meta_valid[first].copy()),
            "targets": {name: torch.tensor(v[first], dtype=torch.int64) for name, v in ds.targets.items()},
            "row": torch.tensor(ds.rows[first], dtype=torch.int64),
            "is_pad": torch.tensor(is_pad, dtype=torch.bool),
            "image_ok": torch.from_numpy(ok),
        }

    @property
    def collate_fn(self) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
        from functools import partial

        from linnaeus.data.device_decode import collate_and_decode
        from linnaeus.data.encoded import collate_samples

        if self.decode == "worker":
            return partial(collate_and_decode, allow_missing=self.rows_dataset.allow_missing)
        return collate_samples
