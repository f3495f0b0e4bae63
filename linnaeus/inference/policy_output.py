"""Decision policies on polli-typus results: a raw (per-rank top-k) result gets its outcomes from a policy.

``threshold`` is typus' ``apply_chow_threshold`` followed by the hierarchy rule (a rank below an abstaining rank
abstains with ``abstain_parent_abstained``; a committed class that is not a child of its committed parent abstains
with ``abstain_hierarchy_conflict``). ``cost`` is typus' ``expected_utility_policy``. ``climb`` builds its outcomes
from :func:`linnaeus.inference.policies.climb`'s decisions. Every result is re-validated by its pydantic model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from typus import (
    AdjustmentReason,
    CandidateRef,
    ClassificationResult,
    DecisionOutcome,
    DecisionPolicy,
    DecisionPolicyKind,
    DecisionScoreSemantics,
    OutcomeAdjustment,
    TaxonCandidate,
    TaxonCandidateMatch,
    cost_matrix_v0_profiles,
)
from typus.helpers.classification import apply_chow_threshold, expected_utility_policy

from linnaeus.data.taxonomy import rank_of_key
from linnaeus.inference import policies as P

_REASONS = {
    P.COMMIT: AdjustmentReason.COMMIT_THRESHOLDED,
    P.BELOW: AdjustmentReason.ABSTAIN_THRESHOLD_NOT_MET,
    P.PARENT: AdjustmentReason.ABSTAIN_PARENT_ABSTAINED,
    P.CONFLICT: AdjustmentReason.ABSTAIN_HIERARCHY_CONFLICT,
    P.UNMAPPED: AdjustmentReason.ABSTAIN_UNMAPPED_TAXON,
}


def _validate(result: ClassificationResult) -> ClassificationResult:
    return ClassificationResult.model_validate(result.model_dump(mode="python"))


def _ref(level: int, taxon_id: int) -> CandidateRef:
    return CandidateRef(rank_level=level, match=TaxonCandidateMatch(taxon_id=int(taxon_id)))


def _top(result: ClassificationResult, level: int) -> TaxonCandidate | None:
    rank = next(r for r in result.ranks if r.rank_level == level)
    taxa = [c for c in rank.candidates if isinstance(c, TaxonCandidate)]
    return max(taxa, key=lambda c: c.score) if taxa else None


def by_level(values: Mapping[str, Any]) -> dict[int, Any]:
    return {int(rank_of_key(k)): v for k, v in values.items()}


def threshold_result(raw: ClassificationResult, spec: P.PolicySpec) -> ClassificationResult:
    taus = by_level(spec.parameters["tau_by_rank"])
    out = apply_chow_threshold(raw, taus)
    policy = out.provenance.decision_policies[-1]
    policy.parameters = {**spec.parameters, "tau_by_rank": taus, "child_abstains_when_parent_abstains": True}
    committed_parent: TaxonCandidate | None = None
    parent_abstained = False
    fixed = []
    for o in sorted(out.outcomes or [], key=lambda o: -o.rank_level):  # coarse → fine
        top = _top(out, o.rank_level)
        if o.decision == "commit" and parent_abstained:
            o = _abstain(o, AdjustmentReason.ABSTAIN_PARENT_ABSTAINED)
        elif o.decision == "commit" and committed_parent is not None and top is not None:
            ancestors = top.ancestor_taxon_ids_by_rank or {}
            if ancestors.get(committed_parent.rank_level) != committed_parent.taxon_id:
                o = _abstain(o, AdjustmentReason.ABSTAIN_HIERARCHY_CONFLICT)
        if o.decision == "commit":
            committed_parent = top
        else:
            parent_abstained = True
        fixed.append(o)
    order = {o.rank_level: o for o in fixed}
    out.outcomes = [order[r.rank_level] for r in out.ranks]
    return _validate(out)


def _abstain(o: DecisionOutcome, reason: AdjustmentReason) -> DecisionOutcome:
    return o.model_copy(
        update={
            "decision": "abstain",
            "resolved_to": None,
            "adjustment": OutcomeAdjustment(
                reason=reason, applied_candidate=o.adjustment.applied_candidate, suppressed_from=o.resolved_to
            ),
        }
    )


def climb_result(
    raw: ClassificationResult,
    spec: P.PolicySpec,
    chosen: Mapping[int, int | None],
    reasons: Mapping[int, int],
    scores: Mapping[int, float],
) -> ClassificationResult:
    """``chosen``: rank level → committed taxon id (None: abstain); ``reasons``: rank level → policies reason code;
    ``scores``: the taxon's chain probability (committed) or the rank's best one (abstained)."""
    out = raw.model_copy(deep=True)
    policy = DecisionPolicy(
        id=f"p{len(out.provenance.decision_policies)}",
        kind=DecisionPolicyKind.MAX_PROBABILITY_THRESHOLD,
        parameters={
            "algorithm": "hierarchical_climb",
            "score": "chain probability: sum of the finest-rank descendants' probabilities",
            **spec.parameters,
        },
        chain_order=len(out.provenance.decision_policies),
    )
    out.provenance.decision_policies = [*out.provenance.decision_policies, policy]
    outcomes = []
    for rank in out.ranks:
        level = rank.rank_level
        tid = chosen.get(level)
        top = _top(out, level)
        if tid is not None:
            ref = _ref(level, tid)
            outcomes.append(
                DecisionOutcome(
                    rank_level=level,
                    decision="commit",
                    resolved_to=ref,
                    decision_score=float(scores[level]),
                    decision_score_semantics=DecisionScoreSemantics.POLICY_CONFIDENCE,
                    derived_from_policy_id=policy.id,
                    adjustment=OutcomeAdjustment(reason=AdjustmentReason.COMMIT_THRESHOLDED, applied_candidate=ref),
                )
            )
            continue
        guess = _ref(level, top.taxon_id) if top is not None else None
        if guess is None:  # a rank with no listed taxon: nothing to point at but its null candidate
            from typus import RankNullCandidateMatch

            guess = CandidateRef(rank_level=level, match=RankNullCandidateMatch())
        outcomes.append(
            DecisionOutcome(
                rank_level=level,
                decision="abstain",
                resolved_to=None,
                decision_score=float(scores[level]),
                decision_score_semantics=DecisionScoreSemantics.POLICY_CONFIDENCE,
                derived_from_policy_id=policy.id,
                adjustment=OutcomeAdjustment(reason=_REASONS[int(reasons[level])], applied_candidate=guess),
            )
        )
    out.outcomes = outcomes
    return _validate(out)


def cost_result(raw: ClassificationResult, spec: P.PolicySpec) -> ClassificationResult:
    profiles = cost_matrix_v0_profiles()
    matrix = profiles[spec.parameters["profile"]]
    out = expected_utility_policy(raw, matrix)
    policy = out.provenance.decision_policies[-1]
    policy.parameters = {**(policy.parameters or {}), "profile": spec.parameters["profile"]}
    return _validate(out)


def committed_rank_of(result: ClassificationResult) -> tuple[int | None, int | None]:
    """(rank level, taxon id) of the deepest committed outcome, or (None, None)."""
    commits = [o for o in result.outcomes or [] if o.decision == "commit" and o.resolved_to is not None]
    if not commits:
        return None, None
    o = min(commits, key=lambda o: o.rank_level)
    match = o.resolved_to.match
    return o.rank_level, getattr(match, "taxon_id", None)
