"""Decision policies on (calibrated) per-rank probabilities: which rank an answer commits to.

- ``repair``: the best consistent chain (``decoding.decode``), committed at every rank it has a class;
- ``threshold``: per rank, commit the rank's most probable class when its probability exceeds tau_rank (Chow's
  rule, as typus' ``apply_chow_threshold``), and only below a committed parent whose child it is (otherwise the
  rank abstains: its parent abstained, or the two disagree);
- ``climb``: hierarchical selective classification: the probability of a taxon is the sum of its descendant
  finest-rank classes' probabilities; commit the deepest rank whose best taxon reaches theta, and its ancestors;
- ``cost``: typus' ``expected_utility_policy`` with a named ``TaxonomyCostMatrix`` profile (on results only).

Thresholds and theta are fitted on a labelled split for a target accuracy of the committed answers (an answer is
its deepest committed taxon; it is right when that taxon is the true one at its rank).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from linnaeus.errors import ConfigError
from linnaeus.inference.decoding import Hierarchy, chain_scores

POLICIES = ("repair", "threshold", "climb", "cost")
COST_PROFILES = ("v0_conservative", "v0_balanced", "v0_aggressive")
DEFAULT_TARGET = 0.95

# reason codes per rank (mapped to typus AdjustmentReason when results are built)
COMMIT, COMMIT_REPAIRED, BELOW, PARENT, CONFLICT, UNMAPPED, UTILITY = range(7)


@dataclass
class Decisions:
    """Per row and rank (coarse → fine): the committed class (-1: abstain), a reason code and a decision score."""

    chosen: np.ndarray  # (N, R) int64
    reason: np.ndarray  # (N, R) int8
    score: np.ndarray  # (N, R) float64

    @property
    def committed_rank(self) -> np.ndarray:
        """(N,) the deepest committed rank index, -1 when nothing is committed."""
        on = self.chosen >= 0
        r = on.shape[1]
        deepest = r - 1 - np.argmax(on[:, ::-1], axis=1)
        return np.where(on.any(axis=1), deepest, -1)

    @property
    def committed_class(self) -> np.ndarray:
        r = self.committed_rank
        return np.where(r >= 0, self.chosen[np.arange(len(r)), np.maximum(r, 0)], -1)


@dataclass
class PolicySpec:
    kind: str
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "parameters": self.parameters}


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


# ------------------------------------------------------------------------------------------------ policies
def repair(log_probs: Sequence[Any], h: Hierarchy) -> Decisions:
    lps = [torch.as_tensor(_np(lp)) for lp in log_probs]
    chains = torch.as_tensor(h.chains)
    total, score = chain_scores(lps, chains, h.refined)
    best = score.argmax(dim=1).numpy()
    chosen = h.chains[best].astype(np.int64)
    argmax = np.stack([lp.argmax(dim=1).numpy() for lp in lps], axis=1)
    reason = np.where(chosen < 0, UNMAPPED, np.where(chosen == argmax, COMMIT, COMMIT_REPAIRED)).astype(np.int8)
    prob = np.exp(total.numpy()[np.arange(len(best)), best])
    return Decisions(chosen, reason, np.repeat(prob[:, None], len(lps), axis=1))


def threshold(probs: Sequence[Any], h: Hierarchy, taus: Sequence[float]) -> Decisions:
    ps = [_np(p) for p in probs]
    n, r_count = ps[0].shape[0], len(ps)
    chosen = np.full((n, r_count), -1, np.int64)
    reason = np.zeros((n, r_count), np.int8)
    score = np.zeros((n, r_count))
    rows = np.arange(n)
    for r, p in enumerate(ps):
        a = p.argmax(axis=1)
        conf = p[rows, a]
        score[:, r] = conf - taus[r]
        above = conf > taus[r]
        if r == 0:
            parent_ok, conflict = np.ones(n, bool), np.zeros(n, bool)
        else:
            parent = chosen[:, r - 1]
            parent_ok = parent >= 0
            conflict = parent_ok & (h.paths[r][a, r - 1] != parent)
        commit = above & parent_ok & ~conflict
        chosen[:, r] = np.where(commit, a, -1)
        reason[:, r] = np.select([commit, ~parent_ok, conflict], [COMMIT, PARENT, CONFLICT], default=BELOW).astype(
            np.int8
        )
    return Decisions(chosen, reason, score)


def rank_chain_probs(finest: np.ndarray, h: Hierarchy) -> list[np.ndarray]:
    """Per rank, (N, K_r): each taxon's probability as the sum of its finest-rank descendants'."""
    anc = h.paths[-1]
    out = []
    for r, k_r in enumerate(h.num_classes):
        m = np.zeros((anc.shape[0], k_r))
        on = anc[:, r] >= 0
        m[np.nonzero(on)[0], anc[on, r]] = 1.0
        out.append(finest @ m)
    return out


def climb(probs: Sequence[Any], h: Hierarchy, theta: float) -> Decisions:
    return _climb(_climb_inputs(probs, h), h, theta)


def _climb_inputs(probs: Sequence[Any], h: Hierarchy) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    agg = rank_chain_probs(_np(probs[-1]), h)
    rows = np.arange(agg[0].shape[0])
    best = np.stack([a.argmax(axis=1) for a in agg], axis=1)
    best_p = np.stack([a[rows, best[:, r]] for r, a in enumerate(agg)], axis=1)
    return agg, best, best_p


def _climb(inputs: tuple[list[np.ndarray], np.ndarray, np.ndarray], h: Hierarchy, theta: float) -> Decisions:
    agg, best, best_p = inputs
    n, r_count = best.shape
    rows = np.arange(n)
    reach = best_p >= theta
    # deepest rank whose best taxon reaches theta (probabilities only shrink going down a path)
    deep = np.where(reach.any(axis=1), r_count - 1 - np.argmax(reach[:, ::-1], axis=1), -1)
    chosen = np.full((n, r_count), -1, np.int64)
    ranks = np.arange(r_count)
    reason = np.where(ranks == 0, BELOW, PARENT)[None, :].repeat(n, axis=0).astype(np.int8)
    for d in range(r_count):
        sel = deep == d
        if not sel.any():
            continue
        path = h.paths[d][best[sel, d]]  # (m, R): the committed taxon's classes at every rank
        upto = ranks <= d
        chosen[sel] = np.where(upto, path, -1)
        below = np.where(ranks == d + 1, BELOW, PARENT)
        reason[sel] = np.where(upto, np.where(path >= 0, COMMIT, UNMAPPED), below).astype(np.int8)
    score = np.stack([a[rows, np.maximum(chosen[:, r], 0)] for r, a in enumerate(agg)], axis=1)
    return Decisions(chosen, reason, np.where(chosen >= 0, score, best_p))


def decide(spec: PolicySpec, log_probs: Sequence[Any], h: Hierarchy) -> Decisions:
    if spec.kind == "repair":
        return repair(log_probs, h)
    probs = [np.exp(_np(lp)) for lp in log_probs]
    if spec.kind == "threshold":
        return threshold(probs, h, [float(spec.parameters["tau_by_rank"][k]) for k in h.keys])
    if spec.kind == "climb":
        return climb(probs, h, float(spec.parameters["theta"]))
    raise ConfigError(f"--policy {spec.kind}: array decisions exist for repair, threshold and climb")


# ------------------------------------------------------------------------------------------------ fitting
def answer_correct(d: Decisions, targets: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(judged, right): rows with a committed answer whose true class at that rank is known, and whether the
    answer is that class."""
    rank, cls = d.committed_rank, d.committed_class
    y = np.stack([np.asarray(t) for t in targets], axis=1)
    truth = np.where(rank >= 0, y[np.arange(len(rank)), np.maximum(rank, 0)], -1)
    judged = (rank >= 0) & (truth >= 0)
    return judged, judged & (cls == truth)


def _best_cut(
    conf: np.ndarray, gain_right: np.ndarray, gain_judged: np.ndarray, base: tuple[float, float], target: float
) -> float:
    """The threshold ``p > tau`` accepting the most of these rows (most confident first) such
    that the overall accuracy (base right + gained right) / (base judged + gained judged) stays >= target."""
    if len(conf) == 0:
        return 1.0
    order = np.argsort(-conf, kind="stable")
    c = conf[order]
    right = base[0] + np.cumsum(gain_right[order])
    judged = base[1] + np.cumsum(gain_judged[order])
    acc = right / np.maximum(judged, 1)
    cut = np.append(c[1:] < c[:-1], True)  # only between distinct confidences: "p > tau" accepts exactly these
    good = np.nonzero((acc >= target) & cut & (judged > 0))[0]
    if good.size == 0:
        return 1.0
    i = good[-1]
    return float(c[i + 1]) if i + 1 < len(c) else 0.0


def fit_threshold(log_probs: Sequence[Any], targets: Sequence[np.ndarray], h: Hierarchy, target: float) -> PolicySpec:
    """tau per rank, coarse → fine, greedily: each rank commits as many rows (below a committed, agreeing parent)
    as keeps the accuracy of all committed answers (each row's deepest committed taxon) >= ``target``."""
    probs = [np.exp(_np(lp)) for lp in log_probs]
    n = probs[0].shape[0]
    rows = np.arange(n)
    taus: list[float] = []
    fitted: dict[str, Any] = {}
    ans_right = np.zeros(n, bool)  # the current answer is right
    ans_judged = np.zeros(n, bool)  # the row has an answer whose truth is known
    for r, key in enumerate(h.keys):
        a = probs[r].argmax(axis=1)
        conf = probs[r][rows, a]
        y = np.asarray(targets[r])
        eligible = y >= 0
        if r:
            parent = threshold(probs[:r], h, taus).chosen[:, r - 1]
            eligible &= (parent >= 0) & (h.paths[r][a, r - 1] == parent)
        right = a == y
        base = (float((ans_right & ans_judged).sum()), float(ans_judged.sum()))
        gain_right = right.astype(np.int64) - (ans_right & ans_judged)
        gain_judged = (~ans_judged).astype(np.int64)
        tau = _best_cut(conf[eligible], gain_right[eligible], gain_judged[eligible], base, target)
        taus.append(tau)
        committed = eligible & (conf > tau)
        ans_right = np.where(committed, right, ans_right)
        ans_judged |= committed
        fitted[key] = {"tau": tau, "committed": int(committed.sum()), "eligible": int(eligible.sum())}
    final = threshold(probs, h, taus)
    judged, right = answer_correct(final, targets)
    return PolicySpec(
        "threshold",
        {
            "tau_by_rank": dict(zip(h.keys, taus, strict=True)),
            "target_accuracy": target,
            "fit": {
                "per_rank": fitted,
                "coverage": float((final.committed_rank >= 0).mean()) if n else 0.0,
                "accuracy": float(right.sum() / max(int(judged.sum()), 1)),
                "rows": n,
            },
        },
    )


def fit_climb(log_probs: Sequence[Any], targets: Sequence[np.ndarray], h: Hierarchy, target: float) -> PolicySpec:
    """theta: the smallest on a grid whose committed answers reach ``target`` accuracy (largest coverage)."""
    probs = [np.exp(_np(lp)) for lp in log_probs]
    n = probs[0].shape[0]
    grid = np.unique(
        np.concatenate([np.linspace(0.0, 1.0, 1001), np.quantile(probs[-1].max(axis=1), np.linspace(0, 1, 201))])
    )
    chosen_theta, best = 1.0, {"coverage": 0.0, "accuracy": float("nan")}
    inputs = _climb_inputs(probs, h)
    for theta in grid:
        d = _climb(inputs, h, float(theta))
        judged, right = answer_correct(d, targets)
        acc = right.sum() / max(int(judged.sum()), 1)
        if judged.any() and acc >= target:
            chosen_theta = float(theta)
            best = {"coverage": float((d.committed_rank >= 0).mean()), "accuracy": float(acc)}
            break
    return PolicySpec("climb", {"theta": chosen_theta, "target_accuracy": target, "fit": {**best, "rows": n}})


def check_policy(name: str, stored: Mapping[str, Any] | None, profile: str | None = None) -> PolicySpec:
    """The spec to apply for ``--policy name``: repair needs nothing, cost a profile, threshold/climb their
    parameters fitted by ``linnaeus calibrate`` (``stored``: the calibration document's ``policies``)."""
    if name not in POLICIES:
        raise ConfigError(f"--policy {name!r}: expected one of {', '.join(POLICIES)}")
    if name == "repair":
        return PolicySpec("repair")
    if name == "cost":
        prof = profile or "v0_balanced"
        if prof not in COST_PROFILES:
            raise ConfigError(f"--cost-profile {prof!r}: expected one of {', '.join(COST_PROFILES)}")
        return PolicySpec("cost", {"profile": prof})
    spec = (stored or {}).get(name)
    if not isinstance(spec, dict) or "parameters" not in spec:
        raise ConfigError(
            f"--policy {name}: this model has no fitted {name} parameters; run `linnaeus calibrate` first "
            "(it fits them on the calibration split for --target-accuracy)"
        )
    return PolicySpec(name, dict(spec["parameters"]))
