"""Losses: per-rank criteria, taxonomy-aware smoothing, null masking, class weights, static/GradNorm task weights."""

from linnaeus.losses.class_weights import class_weights
from linnaeus.losses.criteria import (
    Criterion,
    CrossEntropyCriterion,
    TaxonomyAwareCriterion,
    list_criteria,
    register_criterion,
    soft_cross_entropy,
)
from linnaeus.losses.gradnorm import GradNorm
from linnaeus.losses.smoothing import taxonomy_smoothing_matrix
from linnaeus.losses.task_loss import (
    TaskLoss,
    build_task_loss,
    included_counts,
    needs_distance_matrices,
    step_denominators,
)

__all__ = [
    "Criterion",
    "CrossEntropyCriterion",
    "GradNorm",
    "TaskLoss",
    "TaxonomyAwareCriterion",
    "build_task_loss",
    "class_weights",
    "included_counts",
    "list_criteria",
    "needs_distance_matrices",
    "register_criterion",
    "soft_cross_entropy",
    "step_denominators",
    "taxonomy_smoothing_matrix",
]
