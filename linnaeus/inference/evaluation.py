"""``linnaeus evaluate``'s figures: from one set's uncalibrated log-probabilities to ``metrics.json``.

Main figures use the rows whose finest-rank taxon is a bundle class (or unlabelled there); rows of an unseen
species (novel) are reported on their own (open-set behaviour: did the policy commit a necessarily wrong species,
or stop at a correct genus / family?). Per-rank top-1/top-5 and chain accuracies use the raw per-rank argmax,
validation's definition; temperature scaling never changes an argmax.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from linnaeus.data.taxonomy import rank_name
from linnaeus.inference import eval_metrics as em
from linnaeus.inference.calibration import scale
from linnaeus.inference.decoding import Hierarchy
from linnaeus.inference.policies import PolicySpec, answer_correct, decide


def _probs(lp: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return scale(torch.as_tensor(lp, dtype=torch.float64), temperature).exp().numpy()


def figures(
    log_probs: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    taxa: dict[str, np.ndarray],
    novel: np.ndarray,
    h: Hierarchy,
    names: dict[str, list[str | None]],
    temperatures: dict[str, float],
    policy: PolicySpec | None,
    train_counts: dict[str, np.ndarray] | None,
    policy_decisions: Any = None,
) -> dict[str, Any]:
    """Every figure of one metadata mode. ``policy_decisions``: precomputed ``Decisions`` (the ``cost`` policy,
    which runs on typus results); otherwise the policy is applied here to the calibrated probabilities."""
    keys = list(h.keys)
    known = ~novel
    per_rank: dict[str, Any] = {}
    preds = {}
    for k in keys:
        lp, y = log_probs[k][known], targets[k][known]
        raw = _probs(lp)
        cal = _probs(lp, temperatures.get(k, 1.0))
        pred = raw.argmax(axis=1)
        preds[k] = pred
        lab = y >= 0
        conf, right = cal[lab].max(axis=1), cal[lab].argmax(axis=1) == y[lab]
        entry: dict[str, Any] = {
            "rank": rank_name(h.levels[keys.index(k)]),
            "count": int(lab.sum()),
            "top1": em.topk_accuracy(raw, y, 1),
            "top5": em.topk_accuracy(raw, y, 5),
            "macro": em.macro_accuracy(pred, y),
            "calibration": {"uncalibrated": em.calibration(raw, y)},
            "selective": em.selective(conf, right),
        }
        entry["calibration"]["calibrated"] = em.calibration(cal, y) if k in temperatures else None
        entry["temperature"] = temperatures.get(k)
        if train_counts is not None:
            entry["frequency"] = em.frequency_accuracy(pred, y, train_counts[k])
        per_rank[k] = entry
    out: dict[str, Any] = {"rows": int(known.sum()), "per_rank": per_rank}
    out.update(em.chain_accuracies(preds, {k: targets[k][known] for k in keys}))
    finest = keys[-1]
    out["mistake_severity"] = em.mistake_severity(
        _probs(log_probs[finest][known]), targets[finest][known], h.paths[-1], h.levels, names[finest]
    )
    if policy is not None:
        cal_lps = [
            scale(torch.as_tensor(log_probs[k], dtype=torch.float64), temperatures.get(k, 1.0)).numpy() for k in keys
        ]
        d = policy_decisions if policy_decisions is not None else decide(policy, cal_lps, h)
        out["policy"] = policy_figures(d, targets, known, h, policy)
        if novel.any():
            out["novel"] = novel_figures(d, targets, taxa, novel, h)
    return out


def _rank_shares(rank: np.ndarray, h: Hierarchy) -> dict[str, float]:
    n = max(len(rank), 1)
    shares = {rank_name(level): float((rank == r).sum()) / n for r, level in enumerate(h.levels)}
    shares["none"] = float((rank < 0).sum()) / n
    return shares


def policy_figures(d: Any, targets: dict[str, np.ndarray], rows: np.ndarray, h: Hierarchy, policy: PolicySpec):
    from linnaeus.inference.policies import Decisions

    sub = Decisions(d.chosen[rows], d.reason[rows], d.score[rows])
    ys = [targets[k][rows] for k in h.keys]
    judged, right = answer_correct(sub, ys)
    rank = sub.committed_rank
    return {
        "kind": policy.kind,
        "parameters": {k: v for k, v in policy.parameters.items() if k != "fit"},
        "committed_rank": _rank_shares(rank, h),
        "coverage": float((rank >= 0).mean()) if len(rank) else 0.0,
        "committed_accuracy": float(right.sum() / max(int(judged.sum()), 1)),
        "committed_judged": int(judged.sum()),
        "hierarchical_coverage": em.hierarchical_coverage(h.paths[-1], rank, sub.committed_class),
    }


def novel_figures(
    d: Any, targets: dict[str, np.ndarray], taxa: dict[str, np.ndarray], novel: np.ndarray, h: Hierarchy
) -> dict[str, Any]:
    keys = list(h.keys)
    idx = np.nonzero(novel)[0]
    rank, cls = d.committed_rank[idx], d.committed_class[idx]
    finest = len(keys) - 1
    truth = np.stack([targets[k][idx] for k in keys], axis=1)
    correct_higher = np.array(
        [0 <= r < finest and truth[i, r] >= 0 and cls[i] == truth[i, r] for i, r in enumerate(rank.tolist())], bool
    )
    species_ids, counts = np.unique(taxa[keys[-1]][idx], return_counts=True)
    return {
        "rows": len(idx),
        "taxa": [{"taxon_id": int(t), "rows": int(c)} for t, c in zip(species_ids, counts, strict=True)],
        "committed_rank": _rank_shares(rank, h),
        "committed_finest_rank": float((rank == finest).mean()),
        "stopped_at_correct_higher_rank": float(correct_higher.mean()),
        "abstained": float((rank < 0).mean()),
    }
