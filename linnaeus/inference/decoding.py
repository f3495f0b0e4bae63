"""Hierarchy-consistent decoding of per-rank probabilities.

The reported prediction is one *chain*: a path of the taxonomy through the configured ranks, chosen as a whole.
It is not per-rank argmax with the disagreeing ranks blanked afterwards (the prior trainer's fix), which throws
away a confident coarse prediction whenever the finer argmax sits under another parent.

Chains. Every class whose taxon has no descendant class at a finer configured rank ends one chain; the chain is
that class plus its ancestors (read from the taxonomy tree) at the coarser configured ranks. Usually a chain
holds one class per rank. It holds none at a rank when the taxonomy has no taxon there (a species linked straight
to its family: skip-level) or when that taxon has no class (no training rows), and none at the ranks finer
than a class that has no finer classes (a genus seen only without species labels).

Score. A chain scores the sum of the log-probabilities of its *factors*, compared by their mean. With LinearHead
every class on the chain is a factor: the product of per-rank softmaxes. A refined head (HierarchicalSoftmaxHead,
ConditionalClassifier) adds log p(parent) to its logits, so its softmax p̃(child) already contains the parent
rank's (refined) probability, and multiplying p̃(parent) in again would count the coarse ranks twice (with random
inputs the decoded species then often differs from the refined argmax although that argmax is a consistent
chain). So a class whose next finer rank is refined and present on the chain is not a factor: it is inside its
child's probability. A fully refined complete chain therefore scores p̃(finest class): the finest refined softmax
*is* the model's distribution over complete chains (every finest class has exactly one chain), so this is the
exact joint. (The product of "conditionals" p̃(child)/p̃(parent) telescopes to the same number, but its factors
are not normalised conditionals: p̃(child)/p̃(parent) does not sum to 1 over the parent's children.) A rank whose
parent class is missing on the chain (skip-level: the head gave it the orphan prior) absorbs nothing.

Chains that miss ranks would win just by having fewer factors (each ≤ 1), so chains are compared by their *mean*
log probability over their factors: the same order as the product for chains with equally many factors, and for
a partial chain the same as imputing each missing factor with the geometric mean of its present ones.

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
    # Per rank: its head adds the previous configured rank's log-probability to its logits (refined head).
    refined: tuple[bool, ...] = ()

    @classmethod
    def build(
        cls,
        class_maps: Mapping[str, ClassMap],
        tree: TaxonomyTree | None,
        head_types: Mapping[str, str] | None = None,
    ) -> Hierarchy:
        """``head_types``: task key → ``MODEL.CLASSIFICATION.HEADS.<key>.TYPE`` (missing: LinearHead)."""
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
            refined=refined_ranks(keys, head_types or {}),
        )

    @property
    def chain_score_rule(self) -> str:
        return CHAIN_SCORE_REFINED if any(self.refined) else CHAIN_SCORE_PRODUCT

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


CHAIN_SCORE_PRODUCT = "mean_log_probability_over_ranks_present"
CHAIN_SCORE_REFINED = "mean_log_probability_over_factors_finest_refined_rank_absorbs_its_parents"


def refined_ranks(keys: Sequence[str], head_types: Mapping[str, str]) -> tuple[bool, ...]:
    """Per rank (coarse → fine): whether the model refines its logits with the previous configured rank's, the
    rule ``HierarchicalClassifier`` applies (a conditioning head type, and a coarser configured rank exists)."""
    from linnaeus.models.heads import get_head_class  # importing heads registers the built-in head types

    return tuple(
        r > 0
        and get_head_class(
            head_types.get(key, "LinearHead"), f"MODEL.CLASSIFICATION.HEADS.{key}.TYPE"
        ).conditions_on_parent
        for r, key in enumerate(keys)
    )


def chain_factors(chains: torch.Tensor, refined: Sequence[bool] = ()) -> torch.Tensor:
    """(L, R) bool: the ranks whose probability enters a chain's score (present, and not already inside the
    refined probability of the chain's class at the next finer rank)."""
    present = chains >= 0
    absorbed = torch.zeros_like(present)
    for r in range(chains.shape[1] - 1):
        if r + 1 < len(refined) and refined[r + 1]:
            absorbed[:, r] = present[:, r + 1]
    return present & ~absorbed


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
    chain_probability: float  # product of the chain's factors (raw: of the per-rank argmaxes' probabilities)
    consistent: bool  # the chosen classes form one taxonomy path
    mode: str  # "consistent" | "raw"
    chain_score: str = CHAIN_SCORE_PRODUCT  # the rule the chain was scored by (see the module docstring)

    def chosen(self) -> dict[str, int | None]:
        return {d.key: d.chosen for d in self.ranks}


def chain_scores(
    log_probs: Sequence[torch.Tensor], chains: torch.Tensor, refined: Sequence[bool] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the factors' log probabilities, their mean) per image and chain: two (B, L) tensors."""
    factors = chain_factors(chains, refined)
    total = torch.zeros(log_probs[0].shape[0], chains.shape[0], dtype=torch.float64)
    for r, lp in enumerate(log_probs):
        gathered = lp.index_select(1, chains[:, r].clamp(min=0)).double()
        total += torch.where(factors[:, r], gathered, torch.zeros((), dtype=torch.float64))
    return total, total / factors.sum(dim=1).clamp(min=1)


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
    total, score = chain_scores(lps, chains, hierarchy.refined)
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
        out.append(
            Decoded(ranks, float(np.exp(float(total[b, best[b]]))), True, "consistent", hierarchy.chain_score_rule)
        )
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
