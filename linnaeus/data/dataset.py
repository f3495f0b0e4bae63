"""FileDataset: one sample per image file, labels and metadata already resolved to arrays in memory.

``prepare_data`` reads labels.h5 once (LabelStore), applies filters and the split, and hands this class plain
NumPy arrays for its rows; the dataset only decodes images. Nothing here holds a file handle, so it pickles for
the loader's forkserver workers, whose copies share its large arrays (``worker_share.ArraysToWorkers``).

Randomness: a training sample's crop comes from ``np.random.default_rng((seed, epoch, index))``, a pure function
of the run seed, the epoch and the sample's position in this dataset, so the same seed gives the same batches
with 0, 1 or 2 workers and after a mid-epoch resume. ``EpochSampler`` supplies ``(index, epoch, is_pad)`` keys.

Missing or corrupt images: strict by default (``DataError`` naming the file and its labels.h5 row). With
``allow_missing=True`` the sample gets a mid-grey image and ``image_ok = False``. Workers are separate processes,
so a counter inside the dataset would be lost; the flag travels with the batch instead and the trainer sums
``(~batch["image_ok"]).sum()`` (``missing_count`` counts only this process's own loads, e.g. with 0 workers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from linnaeus.data.device_decode import collate_and_decode
from linnaeus.data.encoded import EncodedImage, check_decode, collate_samples, encode_image
from linnaeus.data.images import PLACEHOLDER_VALUE, ImageDecodeError, load_image
from linnaeus.data.samples import SampleTable
from linnaeus.data.worker_share import ArraysToWorkers
from linnaeus.errors import DataError

log = logging.getLogger(__name__)

_MAX_WARNINGS = 5  # per process; the trainer reports the total from image_ok


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The per-sample generator every reader uses (files and shards), so augmentation is reproducible."""
    return np.random.default_rng((seed % 2**64, epoch % 2**64, index % 2**64))


def parse_key(key: Any) -> tuple[int, int, bool]:
    """An int index, or an ``(index, epoch, is_pad)`` key from ``EpochSampler`` → (index, epoch, is_pad)."""
    if isinstance(key, (tuple, list)):
        index, epoch, is_pad = key
        return int(index), int(epoch), bool(is_pad)
    return int(key), 0, False


class _PathTable(ArraysToWorkers):
    """Many paths as one UTF-8 blob + offsets: no per-string Python objects to copy-on-access after fork or to
    pickle one by one for spawn (a list of 10^7 str is ~1 GB; this is the bytes themselves)."""

    def __init__(self, paths: Sequence[str]) -> None:
        encoded = [str(p).encode("utf-8") for p in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")


class FileDataset(ArraysToWorkers, Dataset):
    """Images from files, labels/metadata from a ``SampleTable`` (whose ``paths`` must be set); one sample per row."""

    def __init__(
        self,
        table: SampleTable,
        *,
        img_size: int,
        train: bool,
        rrc_scale: tuple[float, float] = (0.35, 1.0),
        rrc_ratio: tuple[float, float] = (0.75, 4 / 3),
        val_crop_pct: float = 0.875,
        allow_missing: bool = False,
        seed: int = 0,
        decode: str = "cpu",
    ) -> None:
        if table.paths is None:
            raise ValueError("FileDataset: the sample table has no image paths")
        self._paths = _PathTable(table.paths)
        self.rows = table.rows
        self.targets = table.targets
        self.meta = table.meta
        self.meta_valid = table.meta_valid
        self.img_size = int(img_size)
        self.train = bool(train)
        self.rrc_scale = (float(rrc_scale[0]), float(rrc_scale[1]))
        self.rrc_ratio = (float(rrc_ratio[0]), float(rrc_ratio[1]))
        self.val_crop_pct = float(val_crop_pct)
        self.allow_missing = bool(allow_missing)
        self.seed = int(seed)
        self.decode = check_decode(decode, "FileDataset")
        self.missing_count = 0

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        return self._paths[index]

    def load(self, index: int, epoch: int = 0) -> tuple[np.ndarray, bool]:
        """Decode sample ``index`` for ``epoch`` → (uint8 CHW image, image_ok)."""
        image, ok = self._load(index, epoch, load_image)
        return image, ok

    def load_encoded(self, index: int, epoch: int = 0) -> tuple[EncodedImage, bool]:
        """Sample ``index`` for ``epoch`` as bytes + planned crop for the device decoder → (encoded, image_ok)."""
        item, ok = self._load(index, epoch, encode_image)
        return (item if ok else EncodedImage.decoded(item)), ok

    def _load(self, index: int, epoch: int, reader: Any) -> tuple[Any, bool]:
        path = self._paths[index]
        rng = sample_rng(self.seed, epoch, index) if self.train else None
        try:
            item = reader(
                path,
                img_size=self.img_size,
                train=self.train,
                rng=rng,
                rrc_scale=self.rrc_scale,
                rrc_ratio=self.rrc_ratio,
                val_crop_pct=self.val_crop_pct,
            )
            return item, True
        except ImageDecodeError as err:
            row = int(self.rows[index])
            if not self.allow_missing:
                raise DataError(
                    f"image {path} (labels.h5 row {row}): {err.reason}; "
                    "fix or remove it, or set DATA.HYBRID.ALLOW_MISSING_IMAGES True to replace and count it"
                ) from None
            self.missing_count += 1
            if self.missing_count <= _MAX_WARNINGS:
                log.warning("image %s (labels.h5 row %d): %s; using a grey placeholder", path, row, err.reason)
            return np.full((3, self.img_size, self.img_size), PLACEHOLDER_VALUE, dtype=np.uint8), False

    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, epoch, is_pad = parse_key(key)
        if not 0 <= index < len(self):
            raise IndexError(f"FileDataset index {index} out of range for {len(self)} samples")
        if self.decode != "cpu":
            encoded, ok = self.load_encoded(index, epoch)
            picture: dict[str, Any] = {"encoded": encoded}
        else:
            image, ok = self.load(index, epoch)
            picture = {"image": torch.from_numpy(image)}
        return {
            **picture,
            "meta": torch.from_numpy(self.meta[index].copy()),
            "meta_valid": torch.from_numpy(self.meta_valid[index].copy()),
            "targets": {k: torch.tensor(v[index], dtype=torch.int64) for k, v in self.targets.items()},
            "row": torch.tensor(self.rows[index], dtype=torch.int64),
            "is_pad": torch.tensor(is_pad, dtype=torch.bool),
            "image_ok": torch.tensor(ok, dtype=torch.bool),
        }

    @property
    def collate_fn(self) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
        """The loader's ``collate_fn`` for this dataset: with ``decode="worker"`` it also decodes the batch, in the
        worker (``device_decode.collate_and_decode``). Small to pickle: it does not hold the dataset."""
        if self.decode == "worker":
            return partial(collate_and_decode, allow_missing=self.allow_missing)
        return collate_samples
