"""Train/validation split: computed once from a seed, saved with the run, reloaded on resume.

Algorithm (single labels file): take the rows that survive the filters (ascending file rows), draw one
permutation with ``np.random.default_rng(TRAIN_VAL_SPLIT_SEED).permutation(n)``, and give the first
``floor(TRAIN_VAL_SPLIT_RATIO * n)`` positions to training and the rest to validation; both lists are then
sorted by row. It depends only on (seed, ratio, surviving rows): not on worker count, process count or time.
The rows are saved to ``split.npz`` so a resumed run (or ``linnaeus shard``) reads them back instead of
recomputing; the saved labels fingerprint makes a changed labels.h5 an error rather than a silent new split, and
every checkpoint records the split's ``digest``, so a resume on any other split (the file deleted) is refused.

Observations (labels.h5 ``observation_ids``, ``DATA.H5.SPLIT_BY: observation``, the default): the same draw
over observations instead of rows (:func:`linnaeus.data.observations.grouped_split`), so every observation's photos
fall on one side. ``DATA.H5.SPLIT_STRATIFY`` draws per class of the finest configured rank, so every class with
two or more observations (rows, when split by row) has one in training. ``split.npz`` records how it was drawn
(``by``, ``stratify``); a file from before these keys reads as a row split.

Pre-split data (``TRAIN_LABELS_PATH``/``VAL_LABELS_PATH``): each file's surviving rows form its split as is.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from linnaeus.errors import DataError
from linnaeus.utils.io import atomic_write_bytes

SPLIT_FILE = "split.npz"


@dataclass
class Split:
    train_rows: np.ndarray  # int64, ascending rows of the train labels file
    val_rows: np.ndarray  # int64, ascending rows of the val labels file (the same file unless pre-split)
    seed: int
    ratio: float
    fingerprint: str  # of the labels file(s) the rows index
    presplit: bool = False
    by: str = "row"  # "row" or "observation": what the draw kept together
    stratify: str = ""  # the task key the draw was stratified by ("" = not stratified)

    def describe(self) -> str:
        """How the split was drawn, for the run summary and ``linnaeus check``."""
        if self.presplit:
            return "pre-split files"
        strat = f", stratified by {self.stratify}" if self.stratify else ""
        return f"by {self.by}, seed {self.seed}, ratio {self.ratio}{strat}"

    @property
    def digest(self) -> str:
        """Names exactly these rows of these labels: recorded in every checkpoint, so a resume on another split
        (``split.npz`` deleted after a labels change) is refused instead of training on validation rows."""
        h = hashlib.sha256(self.fingerprint.encode())
        for rows in (self.train_rows, self.val_rows):
            h.update(np.int64(len(rows)).tobytes())
            h.update(np.ascontiguousarray(rows, dtype="<i8").tobytes())
        return h.hexdigest()

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        np.savez(
            buf,
            train_rows=self.train_rows.astype(np.int64),
            val_rows=self.val_rows.astype(np.int64),
            seed=np.int64(self.seed),
            ratio=np.float64(self.ratio),
            fingerprint=np.array(self.fingerprint),
            presplit=np.bool_(self.presplit),
            by=np.array(self.by),
            stratify=np.array(self.stratify),
        )
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> Split:
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                return cls(
                    train_rows=z["train_rows"].astype(np.int64),
                    val_rows=z["val_rows"].astype(np.int64),
                    seed=int(z["seed"]),
                    ratio=float(z["ratio"]),
                    fingerprint=str(z["fingerprint"]),
                    presplit=bool(z["presplit"]),
                    by=str(z["by"]) if "by" in z.files else "row",
                    stratify=str(z["stratify"]) if "stratify" in z.files else "",
                )
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"split file {path}: cannot be read ({exc}); delete it to recompute the split") from None


def random_split(rows: np.ndarray, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``rows`` into (train, val), each sorted ascending. See the module docstring."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    n = len(rows)
    n_train = min(n, math.floor(ratio * n + 1e-9))  # the epsilon keeps e.g. 0.9 * 10 from flooring to 8
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(rows[perm[:n_train]]), np.sort(rows[perm[n_train:]])


def check_saved(split: Split, fingerprint: str, allowed_train: np.ndarray, allowed_val: np.ndarray, path: Path) -> None:
    """A saved split must index the same labels file(s) and only rows that still pass the filters."""
    if split.fingerprint != fingerprint:
        raise DataError(
            f"split file {path} was made from labels with fingerprint {split.fingerprint[:12]}…, but the labels now"
            f" have {fingerprint[:12]}…; the labels changed since this run started and its checkpoints were trained"
            " on the old split: start a new run for the new labels (another EXPERIMENT.NAME), or restore the labels"
            " file this run was started with (deleting the split file does not help: a resume refuses another split)"
        )
    for name, rows, allowed in (("train", split.train_rows, allowed_train), ("val", split.val_rows, allowed_val)):
        bad = rows[~np.isin(rows, allowed)]
        if len(bad):
            raise DataError(
                f"split file {path}: {len(bad)} {name} rows (first: row {int(bad[0])}) are removed by the current"
                " filters; the filter settings changed since this run started: start a new run with them (another"
                " EXPERIMENT.NAME), or restore the settings this run was started with"
            )
