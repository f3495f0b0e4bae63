"""Evaluation metrics against direct (loop) computations on fixed arrays."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from linnaeus.inference import eval_metrics as em


@pytest.fixture(scope="module")
def fixed():
    rng = np.random.default_rng(7)
    n, k = 400, 8
    logits = rng.normal(size=(n, k)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, k, n)
    y[:20] = -1
    return probs, y


# family (rank 0), genus (rank 1), species (rank 2): 8 species, 4 genera, 2 families
ANC = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 2], [0, 1, 3], [1, 2, 4], [1, 2, 5], [1, 3, 6], [1, 3, 7]])
LEVELS = (30, 20, 10)


def test_accuracy_and_chain(fixed):
    probs, y = fixed
    lab = y >= 0
    top5 = sum(y[i] in np.argsort(-probs[i])[:5] for i in range(len(y)) if lab[i]) / lab.sum()
    assert em.topk_accuracy(probs, y, 5) == pytest.approx(top5)
    pred = probs.argmax(1)
    per_class = [np.mean([pred[i] == c for i in range(len(y)) if y[i] == c]) for c in sorted(set(y[lab]))]
    assert em.macro_accuracy(pred, y) == pytest.approx(np.mean(per_class))
    counts = np.array([500, 150, 101, 100, 20, 19, 5, 0])
    fa = em.frequency_accuracy(pred, y, counts)
    many = [pred[i] == y[i] for i in range(len(y)) if lab[i] and counts[y[i]] > 100]
    few = [pred[i] == y[i] for i in range(len(y)) if lab[i] and counts[y[i]] < 20]
    assert fa["many"]["top1"] == pytest.approx(np.mean(many)) and fa["many"]["rows"] == len(many)
    assert fa["few"]["top1"] == pytest.approx(np.mean(few))
    # chain: rank a fully labelled, rank b partly
    ya = np.array([0, 1, 1, -1, 0])
    yb = np.array([2, -1, 3, 3, -1])
    pa = np.array([0, 1, 0, 1, 1])
    pb = np.array([2, 0, 3, 3, 0])
    ch = em.chain_accuracies({"a": pa, "b": pb}, {"a": ya, "b": yb})
    assert ch["chain_accuracy"] == pytest.approx(1 / 2)  # rows 0, 2 fully labelled; row 0 right
    assert ch["partial_chain_accuracy"] == pytest.approx(3 / 5)  # rows 0, 1, 3 right; row 4 wrong


def test_calibration_against_loops(fixed):
    probs, y = fixed
    lab = y >= 0
    p, t = probs[lab], y[lab]
    conf, correct = p.max(1), p.argmax(1) == t
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += sel.sum() / len(conf) * abs(correct[sel].mean() - conf[sel].mean())
    cal = em.calibration(probs, y)
    assert cal["ece"] == pytest.approx(total)
    assert cal["nll"] == pytest.approx(-np.mean([math.log(p[i, t[i]]) for i in range(len(t))]))
    onehot = np.eye(p.shape[1])[t]
    assert cal["brier"] == pytest.approx(np.mean(((p - onehot) ** 2).sum(1)))
    assert sum(cal["reliability"]["count"]) == len(t)
    # perfectly calibrated toy: confidence 0.75 bin, 3 of 4 right
    assert em.ece(np.full(4, 0.75), np.array([1, 1, 1, 0], bool)) == pytest.approx(0.0)


def test_selective_against_loops(fixed):
    probs, y = fixed
    lab = y >= 0
    conf, correct = probs[lab].max(1), probs[lab].argmax(1) == y[lab]
    n = len(conf)
    order = np.argsort(-conf, kind="stable")
    risks = [np.mean(~correct[order[:i]]) for i in range(1, n + 1)]
    grisks = [np.sum(~correct[order[:i]]) / n for i in range(1, n + 1)]
    s = em.selective(conf, correct)
    assert s["aurc"] == pytest.approx(np.mean(risks))
    assert s["augrc"] == pytest.approx(np.mean(grisks))
    assert s["accuracy_at_coverage"]["0.5"] == pytest.approx(correct[order[: math.ceil(0.5 * n)]].mean())
    best = max([i / n for i in range(1, n + 1) if 1 - risks[i - 1] >= 0.9], default=0.0)
    assert s["coverage_at_accuracy"]["0.9"] == pytest.approx(best)
    # a perfect ranking (all right answers first) has zero risk until the first error
    c = np.array([0.9, 0.8, 0.7, 0.1])
    ok = np.array([True, True, True, False])
    assert em.selective(c, ok)["coverage_at_accuracy"]["0.99"] == pytest.approx(0.75)


def test_mistake_severity_and_coverage(fixed):
    probs, y = fixed
    names = [f"sp{i}" for i in range(8)]
    ms = em.mistake_severity(probs, y, ANC, LEVELS, names)
    lab = y >= 0
    p, t = probs[lab], y[lab]
    pred = p.argmax(1)

    def height(a, b):
        for h, r in enumerate((2, 1, 0)):
            if ANC[a, r] == ANC[b, r]:
                return h
        return 3

    wrong = [(a, b) for a, b in zip(pred, t, strict=True) if a != b]
    assert ms["mean_lca_height"] == pytest.approx(np.mean([height(a, b) for a, b in wrong]))
    assert ms["share_in_true_genus"] == pytest.approx(np.mean([ANC[a, 1] == ANC[b, 1] for a, b in wrong]))
    assert ms["share_in_true_family"] == pytest.approx(np.mean([ANC[a, 0] == ANC[b, 0] for a, b in wrong]))
    d5 = np.mean([np.mean([height(c, t[i]) for c in np.argsort(-p[i], kind="stable")[:5]]) for i in range(len(t))])
    assert ms["hierarchical_distance_at_k"]["5"] == pytest.approx(d5)
    assert ms["hierarchical_distance_at_k"]["1"] == pytest.approx(
        np.mean([height(a, b) for a, b in zip(pred, t, strict=True)])
    )
    top = ms["confused_pairs"][0]
    pair_counts = Counter((true, predicted) for predicted, true in wrong)
    assert top["count"] == max(pair_counts.values())
    assert pair_counts[(top["true_index"], top["predicted_index"])] == top["count"]
    assert top["true"] == names[top["true_index"]]
    # hierarchical coverage: species answer 1, genus log2(2)/log2(8) -> 2/3, family 1/3, abstain 0
    hc = em.hierarchical_coverage(ANC, np.array([2, 1, 0, -1]), np.array([5, 1, 0, 0]))
    assert hc == pytest.approx((1 + 2 / 3 + 1 / 3 + 0) / 4)
