"""Temperature fitting and the threshold / climb policies on fixed arrays (the hierarchy of conftest's taxonomy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from linnaeus.data.taxonomy import ClassMap, TaxonomyTree
from linnaeus.inference import calibration, policies
from linnaeus.inference.decoding import Hierarchy

# family 1 > genus 10 > species 100, 101; family 1 > genus 11 > species 102; family 2 > genus 12 > species 103
NODES = [(1, 30), (2, 30), (10, 20), (11, 20), (12, 20), (100, 10), (101, 10), (102, 10), (103, 10)]
EDGES = [(1, 10), (1, 11), (2, 12), (10, 100), (10, 101), (11, 102), (12, 103)]


@pytest.fixture(scope="module")
def h() -> Hierarchy:
    tree = TaxonomyTree.from_dict(
        {
            "nodes": [{"id": i, "rank": r, "name": f"t{i}"} for i, r in NODES],
            "edges": [{"source": s, "target": t} for s, t in EDGES],
        }
    )
    maps = {
        "taxa_L30": ClassMap("taxa_L30", 30, np.array([1, 2]), ["f1", "f2"]),
        "taxa_L20": ClassMap("taxa_L20", 20, np.array([10, 11, 12]), ["g10", "g11", "g12"]),
        "taxa_L10": ClassMap("taxa_L10", 10, np.array([100, 101, 102, 103]), ["s100", "s101", "s102", "s103"]),
    }
    return Hierarchy.build(maps, tree)


def test_fitted_temperature_is_the_grid_minimum() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(500, 6)) * 4
    y = np.where(rng.random(500) < 0.6, logits.argmax(1), rng.integers(0, 6, 500))
    lp = torch.log_softmax(torch.as_tensor(logits), dim=1).numpy()
    t = calibration.fit_temperature(lp, y)
    grid = np.exp(np.linspace(math.log(0.05), math.log(20), 800))
    nll = [float(torch.nn.functional.cross_entropy(torch.as_tensor(logits) / g, torch.as_tensor(y))) for g in grid]
    assert t == pytest.approx(grid[int(np.argmin(nll))], rel=0.01)
    assert t > 1.0  # 40 % of the labels are noise: the sharp logits are over-confident
    # scaling the log-softmax equals scaling the logits (over all classes)
    torch.testing.assert_close(
        calibration.scale(torch.as_tensor(lp), t), torch.log_softmax(torch.as_tensor(logits) / t, dim=1)
    )
    doc = calibration.fit({"taxa_L10": lp}, {"taxa_L10": y}, "x")
    r = doc["per_rank"]["taxa_L10"]
    assert r["nll_after"] <= r["nll_before"] and r["temperature"] == pytest.approx(t)


def test_threshold_and_climb_decisions(h: Hierarchy) -> None:
    fam = np.array([[0.9, 0.1], [0.95, 0.05], [0.3, 0.7]])
    gen = np.array([[0.85, 0.1, 0.05], [0.1, 0.85, 0.05], [0.3, 0.3, 0.4]])
    spe = np.array([[0.5, 0.4, 0.05, 0.05], [0.05, 0.05, 0.85, 0.05], [0.3, 0.3, 0.1, 0.3]])
    d = policies.threshold([fam, gen, spe], h, [0.8, 0.8, 0.8])
    assert d.chosen.tolist() == [[0, 0, -1], [0, 1, 2], [-1, -1, -1]]
    assert d.reason.tolist() == [
        [policies.COMMIT, policies.COMMIT, policies.BELOW],
        [policies.COMMIT, policies.COMMIT, policies.COMMIT],
        [policies.BELOW, policies.PARENT, policies.PARENT],
    ]
    # a confident child under another parent than the committed one abstains (hierarchy conflict)
    conflict = policies.threshold([fam[:1], np.array([[0.05, 0.05, 0.9]]), spe[:1]], h, [0.8, 0.8, 0.8])
    assert conflict.chosen.tolist() == [[0, -1, -1]] and conflict.reason[0, 1] == policies.CONFLICT
    # climb sums species into genera and families: row 0 -> genus 10 (0.9), species 0.5 < 0.8
    c = policies.climb([fam, gen, spe], h, 0.8)
    assert c.chosen.tolist() == [[0, 0, -1], [0, 1, 2], [-1, -1, -1]]
    assert c.score[0, 1] == pytest.approx(0.9)
    assert c.committed_rank.tolist() == [1, 2, -1]
    judged, right = policies.answer_correct(c, [np.array([0, 0, 1]), np.array([0, 1, 2]), np.array([1, 2, 3])])
    assert judged.tolist() == [True, True, False] and right.tolist() == [True, True, False]


def test_fitted_threshold_reaches_its_target_on_the_fit_rows(h: Hierarchy) -> None:
    rng = np.random.default_rng(0)
    n = 2000
    ys = [rng.integers(0, 2, n), None, None]
    ys[1] = np.where(ys[0] == 0, rng.integers(0, 2, n), 2)
    ys[2] = np.array([{0: rng.integers(0, 2), 1: 2, 2: 3}[g] for g in ys[1]])
    probs = []
    for r, k in enumerate(h.num_classes):
        conf = rng.uniform(0.3, 1.0, n)
        right = rng.random(n) < conf  # calibrated by construction
        pred = np.where(right, ys[r], (ys[r] + 1) % k)
        p = np.full((n, k), 0.0)
        p[np.arange(n), pred] = conf
        p += (1 - conf)[:, None] / k
        probs.append(np.log(p / p.sum(1, keepdims=True)))
    for target in (0.8, 0.95):
        spec = policies.fit_threshold(probs, ys, h, target)
        assert spec.parameters["fit"]["accuracy"] >= target - 1e-9
        spec_c = policies.fit_climb(probs, ys, h, target)
        assert spec_c.parameters["fit"]["accuracy"] >= target - 1e-9
    assert policies.check_policy("cost", None).parameters == {"profile": "v0_balanced"}
    with pytest.raises(Exception, match="run `linnaeus calibrate` first"):
        policies.check_policy("climb", None)
