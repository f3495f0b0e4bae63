"""Observation-level splits: no observation on both sides; stratified, every class with >= 2 observations trains."""

from __future__ import annotations

import numpy as np

from linnaeus.data.observations import disagreements, grouped_split, observation_codes, observation_stats


def _dataset(seed: int = 0, n_obs: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    views = rng.integers(1, 6, n_obs)  # 1-5 photos per observation
    ids = np.repeat(np.array([f"obs-{i}" for i in rng.permutation(n_obs)]), views)
    labels = np.repeat(rng.integers(1, 40, n_obs), views)
    return ids, labels, np.arange(len(ids), dtype=np.int64)


def test_no_observation_falls_on_both_sides() -> None:
    ids, labels, rows = _dataset()
    codes = observation_codes(ids)
    for strata in (None, labels):
        train, val = grouped_split(rows, codes, 0.8, seed=3, strata=strata)
        assert len(train) + len(val) == len(rows)
        assert not set(ids[train]) & set(ids[val])
        assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)


def test_stratified_split_trains_every_class_with_two_observations() -> None:
    ids, labels, rows = _dataset(seed=1)
    codes = observation_codes(ids)
    train, _ = grouped_split(rows, codes, 0.5, seed=0, strata=labels)
    obs_per_class = {c: len(set(ids[labels == c])) for c in np.unique(labels)}
    trained = set(labels[train])
    assert all(c in trained for c, n in obs_per_class.items() if n >= 2)
    # the unstratified split, on the same data and ratio, loses some of them: the option matters
    plain, _ = grouped_split(rows, codes, 0.1, seed=0)
    assert any(c not in set(labels[plain]) for c, n in obs_per_class.items() if n >= 2)


def test_split_depends_only_on_seed_ratio_rows_and_ids() -> None:
    ids, _, rows = _dataset()
    codes = observation_codes(ids)
    a = grouped_split(rows, codes, 0.8, seed=5)
    shuffled = np.random.default_rng(9).permutation(len(rows))
    b = grouped_split(rows[shuffled], codes[shuffled], 0.8, seed=5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = grouped_split(rows, codes, 0.8, seed=6)
    assert not np.array_equal(a[0], c[0])


def test_codes_stats_and_disagreements() -> None:
    ids = np.array([7, 7, 3, 9, 9, 9])
    codes = observation_codes(ids)
    np.testing.assert_array_equal(codes, [0, 0, 1, 2, 2, 2])
    s = observation_stats(codes)
    assert (s.observations, s.views_min, s.views_median, s.views_max) == (3, 1, 2.0, 3)
    assert s.line() == "3 observations, views per observation min 1 / median 2 / max 3"
    species = np.array([5, 6, 1, 2, 2, 2])
    lat = np.array([0.1, 0.1, 0.2, np.nan, np.nan, 0.3])
    lines = disagreements(ids, codes, np.arange(6) + 100, {"taxa_L10": species, "spatial": lat})
    assert lines == [
        "observation 7 (rows 100, 101): its photos disagree on taxa_L10",
        "observation 9 (rows 103, 104, 105): its photos disagree on spatial",
    ]
