"""``SampleTable``: everything known about the samples of one split, aligned by position.

``PreparedData.samples(split)`` builds it from the label store; the file dataset and the shard reader read it. It is
plain NumPy (no file handles), so it pickles for loader workers (which share its arrays, ``worker_share``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SampleTable:
    """``rows`` int64 (N,): labels.h5 row of each sample. ``targets``: task key → int64 (N,) class index, -1 = null.
    ``meta`` float32 (N, D) packed by component IDX; ``meta_valid`` bool (N, C). ``paths``: image file per sample, or
    None where images come from elsewhere (shards)."""

    rows: np.ndarray
    targets: dict[str, np.ndarray]
    meta: np.ndarray
    meta_valid: np.ndarray
    paths: Sequence[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.rows)
        object.__setattr__(self, "rows", np.ascontiguousarray(self.rows, dtype=np.int64))
        object.__setattr__(
            self, "targets", {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in self.targets.items()}
        )
        object.__setattr__(self, "meta", np.ascontiguousarray(self.meta, dtype=np.float32).reshape(n, -1))
        object.__setattr__(self, "meta_valid", np.ascontiguousarray(self.meta_valid, dtype=bool).reshape(n, -1))
        columns = [("meta", self.meta), ("meta_valid", self.meta_valid)]
        columns += [(f"targets[{k}]", v) for k, v in self.targets.items()]
        if self.paths is not None:
            columns.append(("paths", self.paths))
        for name, column in columns:
            if len(column) != n:
                raise ValueError(f"SampleTable: {name} has {len(column)} entries for {n} rows")

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray) -> SampleTable:
        """The samples at ``positions``, in that order."""
        pos = np.asarray(positions, dtype=np.int64)
        paths = None if self.paths is None else [self.paths[i] for i in pos]
        return SampleTable(
            self.rows[pos], {k: v[pos] for k, v in self.targets.items()}, self.meta[pos], self.meta_valid[pos], paths
        )

    def sorted_by_row(self) -> SampleTable:
        """The same samples ordered by labels.h5 row (for ``np.searchsorted`` lookups by row)."""
        return self.take(np.argsort(self.rows, kind="stable"))
