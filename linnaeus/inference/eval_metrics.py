"""Evaluation metrics on arrays (pure numpy): accuracy, calibration, selective prediction, mistake severity.

Conventions. ``probs`` is (N, K) per-rank probabilities (rows sum to 1), ``y`` is (N,) class indices with -1 for
an unlabelled row (skipped by every per-rank metric, as validation skips it). ``anc`` is the finest rank's
class-index path: (K_fine, R) with, per finest class, its class index at each configured rank (coarse → fine; -1
where it has none), i.e. ``Hierarchy.paths[-1]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ECE_BINS = 15
# Training-frequency buckets (images per class in the bundle's training split), the long-tail convention of
# Liu et al. 2019 (OLTR): many > 100, medium 20..100, few < 20.
MANY_ABOVE = 100
FEW_BELOW = 20
COVERAGES = (0.5, 0.8, 0.9)
ACCURACIES = (0.9, 0.95, 0.99)
EPS = 1e-12


def _labelled(y: np.ndarray) -> np.ndarray:
    return np.asarray(y) >= 0


# ------------------------------------------------------------------------------------------------ accuracy
def topk_accuracy(probs: np.ndarray, y: np.ndarray, k: int) -> float:
    """Share of labelled rows whose class is among the k most probable (k clipped to K)."""
    lab = _labelled(y)
    if not lab.any():
        return float("nan")
    p, t = probs[lab], y[lab]
    k = min(k, p.shape[1])
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return float((top == t[:, None]).any(axis=1).mean())


def macro_accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean over the classes present in ``y`` of each class's accuracy."""
    lab = _labelled(y)
    classes = np.unique(y[lab])
    if classes.size == 0:
        return float("nan")
    return float(np.mean([(pred[lab][y[lab] == c] == c).mean() for c in classes]))


def frequency_accuracy(pred: np.ndarray, y: np.ndarray, train_counts: np.ndarray) -> dict[str, Any]:
    """Top-1 accuracy of the rows whose true class had many (> 100) / medium (20..100) / few (< 20) training images."""
    lab = _labelled(y)
    counts = np.asarray(train_counts)[np.where(lab, y, 0)]
    groups = {"many": counts > MANY_ABOVE, "medium": (counts >= FEW_BELOW) & (counts <= MANY_ABOVE)}
    groups["few"] = counts < FEW_BELOW
    out: dict[str, Any] = {"thresholds": {"many": f"> {MANY_ABOVE}", "medium": f"{FEW_BELOW}..{MANY_ABOVE}"}}
    out["thresholds"]["few"] = f"< {FEW_BELOW}"
    for name, g in groups.items():
        sel = lab & g
        out[name] = {"top1": float((pred[sel] == y[sel]).mean()) if sel.any() else None, "rows": int(sel.sum())}
    return out


def chain_accuracies(pred: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``chain_accuracy`` (every rank labelled and right, over fully labelled rows) and ``partial_chain_accuracy``
    (no labelled rank wrong, over rows with any label): the definitions of validation's ``ValidationMeter``."""
    keys = list(y)
    n = len(next(iter(y.values())))
    all_lab, all_right = np.ones(n, bool), np.ones(n, bool)
    any_lab, lab_right = np.zeros(n, bool), np.ones(n, bool)
    for k in keys:
        valid = _labelled(y[k])
        right = pred[k] == y[k]
        all_lab &= valid
        all_right &= right & valid
        any_lab |= valid
        lab_right &= right | ~valid
    return {
        "chain_accuracy": float(all_right.sum()) / max(int(all_lab.sum()), 1),
        "partial_chain_accuracy": float((lab_right & any_lab).sum()) / max(int(any_lab.sum()), 1),
    }


# ------------------------------------------------------------------------------------------------ calibration
def ece_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Reliability diagram data: per equal-width bin ((i/B, (i+1)/B], confidence 0 in the first), its row count,
    mean confidence and accuracy (NaN for an empty bin)."""
    idx = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=confidence, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "count": count.tolist(),
            "confidence": (conf_sum / count).tolist(),
            "accuracy": (acc_sum / count).tolist(),
        }


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error: sum over bins of (rows in bin / N) * |accuracy - mean confidence|."""
    if len(confidence) == 0:
        return float("nan")
    b = ece_bins(confidence, correct, bins)
    count = np.asarray(b["count"])
    gap = np.abs(np.nan_to_num(np.asarray(b["accuracy"])) - np.nan_to_num(np.asarray(b["confidence"])))
    return float((count * gap).sum() / count.sum())


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    lab = _labelled(y)
    if not lab.any():
        return float("nan")
    return float(-np.log(np.clip(probs[lab, y[lab]], EPS, None)).mean())


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of sum_k (p_k - 1[k = y])^2."""
    lab = _labelled(y)
    if not lab.any():
        return float("nan")
    p = probs[lab].astype(np.float64)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(p)), y[lab]] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def calibration(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    lab = _labelled(y)
    conf = probs[lab].max(axis=1)
    correct = probs[lab].argmax(axis=1) == y[lab]
    return {
        "ece": ece(conf, correct, bins),
        "nll": nll(probs, y),
        "brier": brier(probs, y),
        "reliability": ece_bins(conf, correct, bins),
    }


# ------------------------------------------------------------------------------------------------ selective
def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coverage, selective risk, generalised risk) after accepting the i most confident rows, i = 1..N (ties keep
    input order). Generalised risk = wrong-and-accepted / N (Traub et al. 2024)."""
    n = len(confidence)
    order = np.argsort(-confidence, kind="stable")
    errors = np.cumsum(~correct[order])
    i = np.arange(1, n + 1)
    return i / n, errors / i, errors / n


def selective(confidence: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    """AURC (mean selective risk over the N coverage points), AUGRC (mean generalised risk), accuracy at 50/80/90 %
    coverage and the largest coverage whose accuracy reaches 90/95/99 %."""
    n = len(confidence)
    if n == 0:
        return {"aurc": None, "augrc": None, "accuracy_at_coverage": {}, "coverage_at_accuracy": {}}
    cov, risk, grisk = risk_coverage(confidence, correct)
    acc = 1.0 - risk
    at_cov = {f"{c:g}": float(acc[max(int(np.ceil(c * n)), 1) - 1]) for c in COVERAGES}
    at_acc = {}
    for a in ACCURACIES:
        ok = np.nonzero(acc >= a - 1e-12)[0]
        at_acc[f"{a:g}"] = float(cov[ok[-1]]) if ok.size else 0.0
    return {
        "aurc": float(risk.mean()),
        "augrc": float(grisk.mean()),
        "accuracy_at_coverage": at_cov,
        "coverage_at_accuracy": at_acc,
    }


# ------------------------------------------------------------------------------------------------ hierarchy
def lca_height(anc: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Height in configured ranks of the lowest common ancestor of finest classes ``a`` and ``b`` (broadcast):
    0 same class, 1 same parent rank (e.g. genus), ..., R when they share no configured rank."""
    r_count = anc.shape[1]
    pa, pb = anc[a], anc[b]  # (..., R)
    same = (pa == pb) & (pa >= 0)
    # deepest agreeing rank; ranks are coarse → fine so the last True index
    deepest = np.where(same.any(axis=-1), r_count - 1 - np.argmax(same[..., ::-1], axis=-1), -1)
    return (r_count - 1 - deepest).astype(np.int64)


def mistake_severity(
    probs: np.ndarray,
    y: np.ndarray,
    anc: np.ndarray,
    levels: Sequence[int],
    names: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5),
    top_pairs: int = 20,
) -> dict[str, Any]:
    """For the finest rank: over wrong top-1 answers, the mean LCA height and the share that stay in the true genus
    (level 20) / family (level 30); hierarchical distance@k (Bertinetto et al. 2020: mean LCA height between the true
    class and each of the k most probable, over all labelled rows); the most confused (true, predicted) pairs."""
    lab = _labelled(y)
    p, t = probs[lab], y[lab]
    pred = p.argmax(axis=1)
    wrong = pred != t
    h = lca_height(anc, pred[wrong], t[wrong])
    out: dict[str, Any] = {"wrong": int(wrong.sum()), "mean_lca_height": float(h.mean()) if h.size else None}
    for level, label in ((20, "share_in_true_genus"), (30, "share_in_true_family")):
        if level in levels and h.size:
            r = list(levels).index(level)
            same = (anc[pred[wrong], r] == anc[t[wrong], r]) & (anc[t[wrong], r] >= 0)
            out[label] = float(same.mean())
    order = np.argsort(-p, axis=1, kind="stable")
    out["hierarchical_distance_at_k"] = {
        str(k): float(lca_height(anc, order[:, : min(k, p.shape[1])], t[:, None]).mean()) if len(t) else None
        for k in ks
    }
    pairs: dict[tuple[int, int], int] = {}
    for a, b in zip(t[wrong].tolist(), pred[wrong].tolist(), strict=True):
        pairs[(a, b)] = pairs.get((a, b), 0) + 1
    ranked = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top_pairs]
    out["confused_pairs"] = [
        {
            "true": names[a] if names else a,
            "predicted": names[b] if names else b,
            "true_index": a,
            "predicted_index": b,
            "count": c,
        }
        for (a, b), c in ranked
    ]
    return out


def leaves_under(anc: np.ndarray) -> list[np.ndarray]:
    """Per configured rank r, (K_r,) the number of finest classes below each class (1 at the finest rank)."""
    out = []
    for r in range(anc.shape[1]):
        col = anc[:, r]
        k = int(col.max()) + 1 if (col >= 0).any() else 0
        out.append(np.bincount(col[col >= 0], minlength=k))
    return out


def hierarchical_coverage(anc: np.ndarray, committed_rank: np.ndarray, committed_class: np.ndarray) -> float:
    """Mean over rows of 1 - log2(leaves under the answer) / log2(all leaves) (Goren et al. 2024); an abstention
    (rank -1) scores 0, a finest-rank answer 1."""
    total = anc.shape[0]
    if total <= 1 or len(committed_rank) == 0:
        return float("nan")
    counts = leaves_under(anc)
    scores = np.zeros(len(committed_rank))
    for i, (r, c) in enumerate(zip(committed_rank.tolist(), committed_class.tolist(), strict=True)):
        if r >= 0:
            scores[i] = 1.0 - np.log2(max(int(counts[r][c]), 1)) / np.log2(total)
    return float(scores.mean())
