"""Decoded predictions → polli-typus ``ClassificationResult`` (schema ``classification-result.v1``).

typus 0.8 makes ``ClassificationResult`` the canonical contract (``HierarchicalClassificationResult`` is a deprecated
alias that converts into it), so one result per image is built here and validated by its pydantic model:

- ``ranks``: one ``RankBelief`` per configured rank, coarse → fine, listing ``TaxonCandidate`` s with the taxon id,
  its rank, parent and ancestors by rank, a ``taxon_snapshot`` with the scientific name when the taxonomy has one,
  and ``score`` = that rank's softmax probability (``rank_softmax_probability``). The list order is the decoding's.
- consistent mode: a ``hierarchy_repair`` decision policy (its ``parameters.chain_score`` names the chain-score rule:
  the product of per-rank probabilities for LinearHeads, the finest refined probability for refined heads) and one ``DecisionOutcome`` per rank committing the
  reported chain's class (``commit_top_candidate`` when it is also the rank's own argmax, else
  ``commit_after_repair`` naming the argmax it overrode when listed). A rank where the chain has no class (skip-level
  link, or below a class without finer classes) abstains with ``abstain_unmapped_taxon`` on a ``RankNullCandidate``
  (score 0: the heads have no null class). ``decision_score`` is the chain's joint probability.
- raw mode: no policy and no outcomes (typus's own helpers then read the per-rank top candidates);
  ``consistency.is_consistent`` says whether the per-rank argmaxes happen to form a taxonomy path.
- ``input_context.unit_ids`` holds the image's path (or the caller's id), so every JSON line names its image.
  One result per observation (``predict --observations``) has ``entity_type`` observation, ``evidence_shape``
  multi_view_observation, its photos as ``unit_ids`` and ``aggregation`` saying how they were combined
  (:func:`observation_context`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from typus import (
    AdjustmentReason,
    AggregationStage,
    AttributionGranularity,
    CandidateRef,
    ClassificationConsistency,
    ClassificationInputContext,
    ClassificationProvenance,
    ClassificationResult,
    ClassificationSourceKind,
    DecisionOutcome,
    DecisionPolicy,
    DecisionPolicyKind,
    DecisionScoreSemantics,
    EvidenceShape,
    InputAggregation,
    InputAttribution,
    ModelEvidenceProvenance,
    OutcomeAdjustment,
    PoolingMode,
    RankBelief,
    RankNullCandidate,
    RankNullCandidateMatch,
    RoutingProvenance,
    RoutingStrategy,
    ScoreSemantics,
    TaxonCandidate,
    TaxonCandidateMatch,
    TaxonomyContext,
    TaxonSnapshot,
)

from linnaeus.data.taxonomy import ClassMap, TaxonomyTree, rank_name
from linnaeus.inference.decoding import CHAIN_SCORE_PRODUCT, Decoded

NULL_TAXON_ID = 0  # taxa_LXX's null
POLICY_ID = "p0"
POLICY_PARAMETERS: dict[str, Any] = {
    "algorithm": "best_consistent_chain",
    "chain_score": CHAIN_SCORE_PRODUCT,
    "candidate_order": "best_chain_through_candidate",
}


def policy_parameters(decoded: Decoded) -> dict[str, Any]:
    """The decision policy's parameters: the chain-score rule this result was decoded with (refined heads score a
    chain by the finest refined probability rather than the product of every rank's softmax)."""
    return {**POLICY_PARAMETERS, "chain_score": decoded.chain_score}


@dataclass
class ResultBuilder:
    """Everything static about a bundle's output; :meth:`build` turns one :class:`Decoded` into a result."""

    class_maps: Mapping[str, ClassMap]
    tree: TaxonomyTree | None
    context: TaxonomyContext
    provenance: dict[str, Any]  # ClassificationProvenance fields other than the per-call ones
    model_evidence: ModelEvidenceProvenance | None = None
    # TEMPERATURE_SCALED_RANK_PROBABILITY when the predictor applies the bundle's calibration
    score_semantics: ScoreSemantics = ScoreSemantics.RANK_SOFTMAX_PROBABILITY

    def __post_init__(self) -> None:
        # Candidate fields that never change per image, built once per class.
        self._static: dict[str, list[dict[str, Any]]] = {}
        version = self.context.version or self.context.source
        for key, cmap in self.class_maps.items():
            level = int(cmap.rank)
            rows = []
            for i, tid in enumerate(cmap.taxon_ids.tolist()):
                parent, ancestors = None, {}
                if self.tree is not None and tid in self.tree:
                    parent = self.tree.parent_of(tid)
                    for a in self.tree.ancestors(tid):
                        r = self.tree.rank_of(a)
                        if r is not None:
                            ancestors[int(r)] = int(a)
                name = cmap.names[i] if cmap.names else None
                snapshot = None
                if name:
                    snapshot = TaxonSnapshot(
                        scientific_name=name,
                        rank_level=level,
                        rank_name=rank_name(level),
                        parent_taxon_id=parent,
                        ancestor_taxon_ids_by_rank=ancestors,
                        taxonomy_version=version,
                    )
                rows.append(
                    {
                        "rank_level": level,
                        "rank_name": rank_name(level),
                        "taxon_id": int(tid),
                        "parent_taxon_id": parent,
                        "ancestor_taxon_ids_by_rank": ancestors or None,
                        "taxon_snapshot": snapshot,
                    }
                )
            self._static[key] = rows

    def taxon_id(self, key: str, index: int) -> int:
        return int(self.class_maps[key].taxon_ids[index])

    def build(self, decoded: Decoded, image_id: str, top_k: int, timestamp: str | None = None) -> ClassificationResult:
        consistent = decoded.mode == "consistent"
        ranks: list[RankBelief] = []
        outcomes: list[DecisionOutcome] = []
        for d in decoded.ranks:
            level, name = int(d.level), rank_name(d.level)
            candidates: list[Any] = []
            if consistent and d.chosen is None:
                candidates.append(
                    RankNullCandidate(
                        rank_level=level,
                        rank_name=name,
                        score=0.0,
                        score_semantics=self.score_semantics,
                        null_taxon_id=NULL_TAXON_ID,
                    )
                )
            listed = set()
            # Taxa by score, highest first (the decision is in the outcomes); a rank-null decision, which has no
            # score of its own, stays in front of them.
            for index, prob in sorted(d.candidates, key=lambda c: -float(c[1])):
                listed.add(index)
                candidates.append(
                    TaxonCandidate(
                        **self._static[d.key][index],
                        score=float(prob),
                        score_semantics=self.score_semantics,
                    )
                )
            ranks.append(RankBelief(rank_level=level, rank_name=name, candidates=candidates))
            if consistent:
                outcomes.append(self._outcome(d, level, listed, decoded.chain_probability))
        policies = (
            [
                DecisionPolicy(
                    id=POLICY_ID,
                    kind=DecisionPolicyKind.HIERARCHY_REPAIR,
                    parameters=policy_parameters(decoded),
                    chain_order=0,
                )
            ]
            if consistent
            else []
        )
        return ClassificationResult(
            taxonomy_context=self.context,
            provenance=ClassificationProvenance(
                source_kind=ClassificationSourceKind.MODEL_INFERENCE,
                inference_timestamp=timestamp or datetime.now(timezone.utc).isoformat(timespec="seconds"),
                requested_top_k=int(top_k),
                model_evidence=self.model_evidence,
                decision_policies=policies,
                **self.provenance,
            ),
            input_context=ClassificationInputContext(
                entity_type="image",
                evidence_shape=EvidenceShape.SINGLE_IMAGE,
                unit_count=1,
                unit_ids=[image_id],
                aggregation=InputAggregation(stage=AggregationStage.NONE),
                attribution=InputAttribution(granularity=AttributionGranularity.NONE),
            ),
            consistency=ClassificationConsistency(hierarchy_checked=True, is_consistent=decoded.consistent),
            ranks=ranks,
            outcomes=outcomes if consistent else None,
        )

    def _outcome(self, d: Any, level: int, listed: set[int], chain_probability: float) -> DecisionOutcome:
        if d.chosen is None:
            ref = CandidateRef(rank_level=level, match=RankNullCandidateMatch())
            return DecisionOutcome(
                rank_level=level,
                decision="abstain",
                resolved_to=None,
                decision_score=chain_probability,
                decision_score_semantics=DecisionScoreSemantics.POLICY_CONFIDENCE,
                derived_from_policy_id=POLICY_ID,
                adjustment=OutcomeAdjustment(reason=AdjustmentReason.ABSTAIN_UNMAPPED_TAXON, applied_candidate=ref),
            )
        ref = CandidateRef(rank_level=level, match=TaxonCandidateMatch(taxon_id=self.taxon_id(d.key, d.chosen)))
        repaired = d.chosen != d.argmax
        suppressed = None
        if repaired and d.argmax in listed:
            suppressed = CandidateRef(
                rank_level=level, match=TaxonCandidateMatch(taxon_id=self.taxon_id(d.key, d.argmax))
            )
        return DecisionOutcome(
            rank_level=level,
            decision="commit",
            resolved_to=ref,
            decision_score=chain_probability,
            decision_score_semantics=DecisionScoreSemantics.POLICY_CONFIDENCE,
            derived_from_policy_id=POLICY_ID,
            adjustment=OutcomeAdjustment(
                reason=AdjustmentReason.COMMIT_AFTER_REPAIR if repaired else AdjustmentReason.COMMIT_TOP_CANDIDATE,
                applied_candidate=ref,
                suppressed_from=suppressed,
            ),
        )


def model_evidence(head_types: Mapping[str, str], routing: str, temperature: float) -> ModelEvidenceProvenance:
    """What kind of heads produced the scores (the conditional classifier's routing when one is used)."""
    kinds = set(head_types.values())
    if "ConditionalClassifier" in kinds:
        return ModelEvidenceProvenance(
            head_kind="conditional_classifier",
            routing=RoutingProvenance(
                strategy=RoutingStrategy(routing), temperature=temperature, hierarchy_matrix_applied=True
            ),
            abstention_signal_kind="none",
        )
    if "HierarchicalSoftmaxHead" in kinds:
        return ModelEvidenceProvenance(head_kind="hierarchical_softmax", abstention_signal_kind="none")
    return ModelEvidenceProvenance(head_kind="other", abstention_signal_kind="none")


def taxonomy_context(
    class_maps: Mapping[str, ClassMap], tree: TaxonomyTree | None, source: str, version: str | None
) -> TaxonomyContext:
    """Roots = the top ancestors of the coarsest classes; null id 0 at every configured rank (taxa_LXX's null)."""
    roots: set[int] = set()
    for cmap in class_maps.values():
        for tid in cmap.taxon_ids.tolist():
            chain = tree.ancestors(tid, include_self=True) if tree is not None and tid in tree else [tid]
            roots.add(int(chain[-1]))
    return TaxonomyContext(
        source=source,
        version=version,
        root_taxon_ids=sorted(roots),
        null_taxon_ids_by_rank={int(c.rank): NULL_TAXON_ID for c in class_maps.values()},
    )


POOLING_MODES = {"mean": PoolingMode.MEAN, "lse": PoolingMode.LOGSUMEXP, "attention": PoolingMode.ATTENTION}


def observation_context(
    unit_ids: list[str], pooled_before_heads: bool, mode: str, temperature: float | None = None
) -> ClassificationInputContext:
    """Several photos of one observation (``unit_ids``: the photos): pooled before the heads (a multi-view model;
    ``mode`` its MODEL.VIEW_POOLING) or aggregated after them (an image model: the mean of its per-photo
    log-probabilities, renormalised). ``temperature`` is reported for lse pooling only."""
    stage = AggregationStage.POOLED_BEFORE_HEADS if pooled_before_heads else AggregationStage.AGGREGATED_AFTER_HEADS
    return ClassificationInputContext(
        entity_type="observation",
        evidence_shape=EvidenceShape.MULTI_VIEW_OBSERVATION,
        unit_count=len(unit_ids),
        unit_ids=list(unit_ids),
        aggregation=InputAggregation(
            stage=stage,
            pooling_mode=POOLING_MODES[mode],
            pooling_temperature=temperature if mode == "lse" else None,
        ),
        attribution=InputAttribution(granularity=AttributionGranularity.NONE),
    )
