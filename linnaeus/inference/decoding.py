"""Hierarchy-consistent decoding of per-rank probabilities.

The reported prediction is one *chain*: a path of the taxonomy through the configured ranks, chosen as a whole.
It is not per-rank argmax with the disagreeing ranks blanked afterwards (the prior trainer's fix), which throws
away a confident coarse prediction whenever the finer argmax sits under another parent.

Chains. Every class whose taxon has no descendant class at a finer configured rank ends one chain; the chain is
that class plus its ancestors (read from the taxonomy tree) at the coarser configured ranks. Usually a chain
holds one class per rank. It holds none at a rank when the taxonomy has no taxon there (a species linked straight
to its family: skip-level) or when that taxon has no class (no training rows), and none at the ranks finer
than a class that has no finer classes (a genus seen only without species labels).

Score. A complete chain scores the product of its per-rank softmax probabilities (summed in log space). Chains
that miss ranks would win just by having fewer factors (each ≤ 1), so chains are compared by their *mean* log
probability over the ranks they have: the same order as the product for complete chains, and for a partial chain
the same as imputing each missing factor with the geometric mean of its present ones.

Top-k per rank (consistent mode). A class is ranked by the score of the best chain through it (a max-marginal):
at the finest rank that is the joint score of the class's own chain; at a coarser rank, of its best descendant
chain. The top-1 of every rank is therefore the reported chain, and every listed alternative comes with a whole
consistent chain behind it. Raw mode lists each rank's own top-k softmax probabilities instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from linnaeus.data.taxonomy import ClassMap, TaxonomyTree, keys_coarse_to_fine


@dataclass(frozen=True)
class Hierarchy:
    """Class-index view of the taxonomy over the configured ranks (coarse → fine)."""

    keys: tuple[str, ...]
    levels: tuple[int, ...]
    num_classes: tuple[int, ...]
    # Per rank r: (K_r, R) int64, the class index at every rank on class c's own path; -1 where it has none.
    paths: tuple[np.ndarray, ...]
    chains: np.ndarray  # (L, R) int64: one row per chain, -1 where the chain has no class

    @classmethod
    def build(cls, class_maps: Mapping[str, ClassMap], tree: TaxonomyTree | None) -> Hierarchy:
        keys = keys_coarse_to_fine(class_maps)
        r_count = len(keys)
        paths = []
        for r, key in enumerate(keys):
            cmap = class_maps[key]
            path = np.full((len(cmap), r_count), -1, np.int64)
            path[:, r] = np.arange(len(cmap))
            for r2 in range(r):
                coarse = class_maps[keys[r2]]
                if tree is None:
                    continue
                anc = [tree.ancestor_at(int(t), coarse.rank) or 0 for t in cmap.taxon_ids.tolist()]
                path[:, r2] = coarse.index(np.asarray(anc, np.int64))
            paths.append(path)
        chains = []
        for r in range(r_count):
            has_finer = np.zeros(len(paths[r]), bool)
            for rf in range(r + 1, r_count):
                idx = paths[rf][:, r]
                has_finer[idx[idx >= 0]] = True
            chains.append(paths[r][~has_finer])
        return cls(
            keys=tuple(keys),
            levels=tuple(int(class_maps[k].rank) for k in keys),
            num_classes=tuple(len(class_maps[k]) for k in keys),
            paths=tuple(paths),
            chains=np.concatenate(chains, axis=0) if chains else np.zeros((0, 0), np.int64),
        )

    def is_consistent(self, picks: Sequence[int | None]) -> bool:
        """True when the picked class per rank (coarse → fine; None = nothing) lie on one taxonomy path."""
        norm = [-1 if p is None or p < 0 else int(p) for p in picks]
        for r, c in enumerate(norm):
            if c < 0:
                continue
            for r2 in range(r):
                if self.paths[r][c, r2] != norm[r2]:
                    return False
        return True


@dataclass
class RankDecision:
    """One rank of one image: the listed candidates and the class the decision reports."""

    key: str
    level: int
    candidates: list[tuple[int, float]]  # (class index, softmax probability at this rank), in reported order
    chosen: int | None  # consistent: the reported chain's class (None: the chain has none here); raw: argmax
    argmax: int  # this rank's own most probable class


@dataclass
class Decoded:
    ranks: list[RankDecision]  # coarse → fine
    chain_probability: float  # product of the probabilities of the chosen classes
    consistent: bool  # the chosen classes form one taxonomy path
    mode: str  # "consistent" | "raw"

    def chosen(self) -> dict[str, int | None]:
        return {d.key: d.chosen for d in self.ranks}


def chain_scores(log_probs: Sequence[torch.Tensor], chains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log probabilities, mean over present ranks) per image and chain: two (B, L) tensors."""
    present = chains >= 0
    total = torch.zeros(log_probs[0].shape[0], chains.shape[0], dtype=torch.float64)
    for r, lp in enumerate(log_probs):
        gathered = lp.index_select(1, chains[:, r].clamp(min=0)).double()
        total += torch.where(present[:, r], gathered, torch.zeros((), dtype=torch.float64))
    return total, total / present.sum(dim=1).clamp(min=1)


def decode(
    log_probs: Mapping[str, torch.Tensor], hierarchy: Hierarchy, top_k: int = 5, consistent: bool = True
) -> list[Decoded]:
    """Decode a batch: ``log_probs`` task key → (B, K) log-softmax. Returns one :class:`Decoded` per image."""
    lps = [log_probs[k].detach().float().cpu() for k in hierarchy.keys]
    batch = lps[0].shape[0]
    probs = [lp.exp() for lp in lps]
    argmax = [lp.argmax(dim=1) for lp in lps]
    if not consistent:
        return [_raw(b, lps, probs, argmax, hierarchy, top_k) for b in range(batch)]

    chains = torch.as_tensor(hierarchy.chains)
    total, score = chain_scores(lps, chains)
    best = score.argmax(dim=1)  # (B,)
    ranked: list[torch.Tensor] = []
    for r, k_r in enumerate(hierarchy.num_classes):
        cls = chains[:, r]
        on = cls >= 0
        # Max over the chains through each class: the score of the best consistent chain that contains it.
        best_r = torch.full((batch, k_r), -torch.inf, dtype=torch.float64)
        best_r.scatter_reduce_(1, cls[on].expand(batch, -1), score[:, on], reduce="amax", include_self=True)
        ranked.append(best_r.topk(min(top_k, k_r), dim=1).indices)
    out = []
    for b in range(batch):
        chain = chains[best[b]].tolist()
        ranks = []
        for r, key in enumerate(hierarchy.keys):
            chosen = chain[r] if chain[r] >= 0 else None
            order = ranked[r][b].tolist()
            if chosen is not None and order[0] != chosen:  # a tie: keep the reported chain's class first
                order = [chosen, *[c for c in order if c != chosen][: len(order) - 1]]
            ranks.append(
                RankDecision(
                    key,
                    hierarchy.levels[r],
                    [(c, float(probs[r][b, c])) for c in order],
                    chosen,
                    int(argmax[r][b]),
                )
            )
        out.append(Decoded(ranks, float(np.exp(float(total[b, best[b]]))), True, "consistent"))
    return out


def _raw(
    b: int,
    lps: list[torch.Tensor],
    probs: list[torch.Tensor],
    argmax: list[torch.Tensor],
    hierarchy: Hierarchy,
    top_k: int,
) -> Decoded:
    ranks = []
    log_joint = 0.0
    for r, key in enumerate(hierarchy.keys):
        top = probs[r][b].topk(min(top_k, hierarchy.num_classes[r]))
        a = int(argmax[r][b])
        log_joint += float(lps[r][b, a])
        ranks.append(
            RankDecision(
                key, hierarchy.levels[r], list(zip(top.indices.tolist(), top.values.tolist(), strict=True)), a, a
            )
        )
    picks = [d.chosen for d in ranks]
    return Decoded(ranks, float(np.exp(log_joint)), hierarchy.is_consistent(picks), "raw")
