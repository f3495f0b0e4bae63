"""Observations: one organism photographed several times (labels.h5 ``observation_ids``, one id per row).

Photos of one observation share almost everything, so a split that puts some in training and some in validation
measures memory, not recognition. The split here is drawn over observations (every observation's rows fall on one
side), optionally stratified by a rank's label so every class with two or more observations is trained on. Like the
row split it depends only on (seed, ratio, surviving rows, ids).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


def observation_codes(ids: np.ndarray) -> np.ndarray:
    """Dense int64 codes 0..N-1 for observation ids (integers or strings), in order of first appearance."""
    _, first, inverse = np.unique(np.asarray(ids), return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    return order[inverse.reshape(-1)].astype(np.int64)


def _take(groups: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """The groups of ``groups`` (distinct codes) that go to training: floor(ratio·n) of a seeded permutation."""
    n_train = min(len(groups), math.floor(ratio * len(groups) + 1e-9))
    return groups[rng.permutation(len(groups))[:n_train]]


def grouped_split(
    rows: np.ndarray, codes: np.ndarray, ratio: float, seed: int, strata: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` (with their observation ``codes``, aligned) into (train, val) rows, each ascending.

    Unstratified: floor(ratio·n) of a seeded permutation of the observations train. With ``strata`` (one label per
    row; an observation takes its first row's label), each stratum with n >= 2 observations gives
    min(max(floor(ratio·n), 1), n - 1) of them to training; observations alone in their stratum are split together
    by the ratio."""
    rows, codes = np.asarray(rows, dtype=np.int64), np.asarray(codes, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    rows, codes = rows[order], codes[order]
    groups, first = np.unique(codes, return_index=True)
    rng = np.random.default_rng(seed)
    if strata is None:
        train_groups = _take(groups, ratio, rng)
    else:
        labels = np.asarray(strata)[order][first]
        kinds, counts = np.unique(labels, return_counts=True)
        picked, singletons = [], []
        for kind, count in zip(kinds, counts, strict=True):
            members = groups[labels == kind]
            if count == 1:
                singletons.append(members)
                continue
            n_train = min(max(math.floor(ratio * count + 1e-9), 1), count - 1)
            picked.append(members[rng.permutation(count)[:n_train]])
        if singletons:
            picked.append(_take(np.concatenate(singletons), ratio, rng))
        train_groups = np.concatenate(picked) if picked else np.empty(0, np.int64)
    in_train = np.isin(codes, train_groups)
    return rows[in_train], rows[~in_train]


@dataclass(frozen=True)
class ObservationStats:
    observations: int
    views_min: int
    views_median: float
    views_max: int

    def line(self) -> str:
        return (
            f"{self.observations} observations, views per observation min {self.views_min} / median "
            f"{self.views_median:g} / max {self.views_max}"
        )


def observation_stats(codes: np.ndarray) -> ObservationStats:
    counts = np.bincount(np.asarray(codes, dtype=np.int64)) if len(codes) else np.zeros(0, np.int64)
    counts = counts[counts > 0]
    if not len(counts):
        return ObservationStats(0, 0, 0.0, 0)
    return ObservationStats(len(counts), int(counts.min()), float(np.median(counts)), int(counts.max()))


def disagreements(
    ids: np.ndarray, codes: np.ndarray, rows: np.ndarray, columns: Mapping[str, np.ndarray], limit: int = 20
) -> list[str]:
    """One line per observation whose rows disagree on a column (labels per rank, metadata), rows named."""
    lines: list[str] = []
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        differing = [name for name, col in columns.items() if not _all_equal(col[members])]
        if differing:
            shown = ", ".join(str(int(r)) for r in rows[members][:5]) + (", …" if len(members) > 5 else "")
            lines.append(
                f"observation {_show(ids[members[0]])} (rows {shown}): its photos disagree on {', '.join(differing)}"
            )
            if len(lines) == limit:
                break
    return lines


def _all_equal(values: np.ndarray) -> bool:
    first = values[:1]
    if values.dtype.kind == "f":
        return bool(np.all((values == first) | (np.isnan(values) & np.isnan(first))))
    return bool(np.all(values == first))


def _show(value: object) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text if len(text) <= 40 else text[:39] + "…"
