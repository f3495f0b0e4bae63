"""The multi-rank training loss: per-rank criterion, null masking, class weights, reduction, task weighting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from linnaeus.errors import ConfigError, DataError
from linnaeus.losses.class_weights import class_weights
from linnaeus.losses.criteria import Criterion, get_criterion_class, soft_cross_entropy, validate_loss_params
from linnaeus.losses.gradnorm import GradNorm
from linnaeus.specs.model import LossSpec


def labelled_mask(target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B,) bool: samples with a label at this rank (hard: index ≥ 0; soft: ``valid``, else a non-zero row)."""
    if target.is_floating_point():
        return valid.to(torch.bool) if valid is not None else target.float().sum(dim=-1) > 0
    return target >= 0


def included_counts(included: Mapping[str, torch.Tensor], task_keys: Sequence[str]) -> torch.Tensor:
    """(T,) float32 counts of included samples per rank, in ``task_keys`` order (one tensor: one all-reduce)."""
    return torch.stack([included[k].sum() for k in task_keys]).float()


def step_denominators(
    counts: torch.Tensor, task_keys: Sequence[str], accumulation_steps: int, world_size: int
) -> dict[str, torch.Tensor]:
    """Per-rank denominators for :meth:`TaskLoss.task_losses` from the included counts of a whole optimizer step.

    ``counts``: (T,) included samples per rank summed over the accumulation window and all processes. accelerate
    divides each micro-batch's loss by ``accumulation_steps`` and DDP/ZeRO average gradients over ``world_size``
    processes, so dividing by count / (accumulation_steps · world_size) makes the step's gradient that of
    Σ ℓ / count over every included sample of the step. A rank with no included sample anywhere has a zero loss
    sum, so any positive denominator works there: the count is clamped to ≥ 1.
    """
    scale = float(accumulation_steps * world_size)
    per_rank = counts.float().clamp_min(1.0) / scale
    return {key: per_rank[i] for i, key in enumerate(task_keys)}


class TaskLoss(nn.Module):
    """Σ_t w_t · L_t over ranks, where L_t = Σ over included samples of ℓ / D_t (0 if none are included).

    Included = labelled samples, plus null samples kept with probability ``null_keep_prob``; a kept null trains
    toward the uniform distribution over the rank's classes. Excluded samples contribute exactly zero loss and
    zero gradient. D_t is the number of included samples of this micro-batch (a per-micro-batch mean) unless the
    training loop passes ``denominators`` (see :func:`step_denominators`), which make the optimizer step's gradient
    the mean over all included samples of the step, whatever the accumulation and process count and however the
    labels fall into micro-batches. Class weights (if any) multiply each included sample's loss once, by the
    weight of its target class (Σ_c t_c w_c for a mixed target; 1 for a kept null); they apply in training mode
    only, so validation losses stay comparable across weighting schemes. w_t is ``LOSS.WEIGHT`` per head, or
    GradNorm's weights (started from those) when ``LOSS.GRADNORM.ENABLED``.
    """

    def __init__(
        self,
        criteria: dict[str, Criterion],
        weights: dict[str, float],
        class_weight: dict[str, torch.Tensor] | None = None,
        gradnorm: GradNorm | None = None,
    ) -> None:
        super().__init__()
        self.task_keys = list(criteria)
        self.criteria = nn.ModuleDict(criteria)
        self.register_buffer("static_weights", torch.tensor([weights[k] for k in self.task_keys], dtype=torch.float32))
        for key, w in (class_weight or {}).items():
            self.register_buffer(f"class_weight_{key}", w.float(), persistent=False)
        self.gradnorm = gradnorm

    @property
    def task_weights(self) -> torch.Tensor:
        return self.gradnorm.weights if self.gradnorm is not None else self.static_weights

    def _null_keep(self, null: torch.Tensor, prob: float, generator: torch.Generator | None) -> torch.Tensor:
        if prob <= 0.0:
            return torch.zeros_like(null)
        if prob >= 1.0:
            return null
        device = generator.device if generator is not None else null.device
        draw = torch.rand(null.shape[0], generator=generator, device=device).to(null.device)
        return null & (draw < prob)

    def inclusion(
        self,
        targets: Mapping[str, torch.Tensor],
        valid: Mapping[str, torch.Tensor] | None = None,
        null_keep_prob: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per task key, the (B,) bool mask of samples that enter that rank's loss: the labelled ones plus the nulls
        kept by one draw (per rank, in task order) with probability ``null_keep_prob`` from ``generator``."""
        valid = valid or {}
        out = {}
        for key in self.task_keys:
            labelled = labelled_mask(targets[key], valid.get(key))
            out[key] = labelled | self._null_keep(~labelled, null_keep_prob, generator)
        return out

    def _task_loss(
        self,
        key: str,
        logits: torch.Tensor,
        target: torch.Tensor,
        valid: torch.Tensor | None,
        included: torch.Tensor,
        denominator: torch.Tensor | None,
    ) -> torch.Tensor:
        crit = self.criteria[key]
        z = logits.float()
        k = z.shape[-1]
        if k != crit.num_classes:
            raise ConfigError(f"logits for '{key}' have {k} classes; the loss was built for {crit.num_classes}")
        if included.shape != z.shape[:1]:
            raise ValueError(f"included['{key}'] has shape {tuple(included.shape)}; expected ({z.shape[0]},)")
        included = included.to(device=z.device, dtype=torch.bool)
        cw = getattr(self, f"class_weight_{key}", None) if self.training else None
        if target.is_floating_point():
            soft = target.float()
            dist = crit.soft(soft)
            sample_w = soft @ cw if cw is not None else None
        else:
            index = target.clamp_min(0)
            dist = crit.hard(index)
            sample_w = cw.index_select(0, index) if cw is not None else None
        keep = included & ~labelled_mask(target, valid)  # kept nulls
        dist = torch.where(keep[:, None], torch.full_like(dist, 1.0 / k), dist)
        # Zero the targets of excluded rows so their loss and gradient are exactly 0, even for garbage targets.
        dist = torch.where(included[:, None], dist, torch.zeros_like(dist))
        per_sample = soft_cross_entropy(z, dist)
        if sample_w is not None:
            per_sample = per_sample * torch.where(keep, torch.ones_like(sample_w), sample_w)
        per_sample = torch.where(included, per_sample, torch.zeros_like(per_sample))
        if denominator is None:
            return per_sample.sum() / included.sum().clamp_min(1)
        # The clamp only guards a zero passed by mistake where nothing is included (0 / tiny = 0, never NaN).
        return per_sample.sum() / torch.as_tensor(denominator, dtype=torch.float32, device=z.device).clamp_min(1e-12)

    def task_losses(
        self,
        logits: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        valid: Mapping[str, torch.Tensor] | None = None,
        null_keep_prob: float = 0.0,
        generator: torch.Generator | None = None,
        *,
        included: Mapping[str, torch.Tensor] | None = None,
        denominators: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Unweighted per-rank losses with their graph (what GradNorm.update needs).

        ``included`` (from :meth:`inclusion`) is used as given, with no new null-keep draw; without it the draw
        happens here. ``denominators`` (task → scalar tensor, > 0, see :func:`step_denominators`) replace the
        micro-batch's included count; without them each rank's loss is the micro-batch mean.
        """
        valid = valid or {}
        if included is None:
            included = self.inclusion(targets, valid, null_keep_prob, generator)
        return {
            key: self._task_loss(
                key,
                logits[key],
                targets[key],
                valid.get(key),
                included[key],
                None if denominators is None else denominators[key],
            )
            for key in self.task_keys
        }

    def combine(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack([losses[key] for key in self.task_keys])
        return (self.task_weights.to(stacked.device) * stacked).sum()

    def forward(
        self,
        logits: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        valid: Mapping[str, torch.Tensor] | None = None,
        null_keep_prob: float = 0.0,
        generator: torch.Generator | None = None,
        *,
        included: Mapping[str, torch.Tensor] | None = None,
        denominators: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total weighted loss, per-rank unweighted losses detached)."""
        losses = self.task_losses(
            logits, targets, valid, null_keep_prob, generator, included=included, denominators=denominators
        )
        return self.combine(losses), {k: v.detach() for k, v in losses.items()}


def loss_config_problems(spec: LossSpec, task_keys: Sequence[str]) -> list[str]:
    """Every head's LOSS TYPE/PARAMS problem, validated exactly as ``build_task_loss`` does (for `linnaeus check`)."""
    problems = []
    for key in task_keys:
        head = spec.head(key)
        try:
            validate_loss_params(head.type, dict(head.params), f"MODEL.CLASSIFICATION.HEADS.{key}.LOSS")
        except ConfigError as err:
            problems.append(str(err))
    return problems


def needs_distance_matrices(spec: LossSpec) -> bool:
    """Whether a configured criterion needs the taxonomy distance matrices (costly to compute, so only then)."""
    return any(
        get_criterion_class(h.type, f"MODEL.CLASSIFICATION.HEADS.{key}.LOSS.TYPE").needs_distance
        for key, h in spec.heads.items()
    )


def _distance(key: str, distance_matrices: dict[str, np.ndarray] | None, k: int) -> np.ndarray | None:
    if not distance_matrices or key not in distance_matrices:
        return None
    d = np.asarray(distance_matrices[key])
    if d.shape != (k, k):
        raise DataError(f"distance matrix for '{key}' has shape {d.shape}; expected ({k}, {k}) for its {k} classes")
    return d


def build_task_loss(
    spec: LossSpec,
    task_keys: list[str],
    num_classes: dict[str, int],
    distance_matrices: dict[str, np.ndarray] | None,
    class_counts: dict[str, np.ndarray] | None,
) -> TaskLoss:
    """The TaskLoss for ``MODEL.CLASSIFICATION.HEADS.<task>.LOSS``, ``LOSS.CLASS_WEIGHTING`` and ``LOSS.GRADNORM``.

    ``distance_matrices[task]``: (K, K) tree distance (edges via the LCA, inf when unrelated), needed by
    TaxonomyAwareLabelSmoothing. ``class_counts[task]``: (K,) training label counts, needed by class weighting.
    """
    criteria: dict[str, Criterion] = {}
    weights: dict[str, float] = {}
    for key in task_keys:
        if key not in num_classes:
            raise ConfigError(f"DATA.TASK_KEYS_H5: no class count for '{key}' (have {sorted(num_classes)})")
        head = spec.head(key)
        prefix = f"MODEL.CLASSIFICATION.HEADS.{key}.LOSS"
        cls = get_criterion_class(head.type, f"{prefix}.TYPE")
        distance = _distance(key, distance_matrices, num_classes[key])
        criteria[key] = cls(num_classes[key], dict(head.params), f"{prefix}.PARAMS", distance)
        weights[key] = float(head.weight)

    cw = spec.class_weighting
    class_weight: dict[str, torch.Tensor] = {}
    if cw.type != "none":
        for key in task_keys:
            counts = (class_counts or {}).get(key)
            if counts is None:
                raise ConfigError(f"LOSS.CLASS_WEIGHTING.TYPE: '{cw.type}' needs training class counts for '{key}'")
            counts = np.asarray(counts)
            if counts.shape != (num_classes[key],):
                raise DataError(f"class counts for '{key}' have shape {counts.shape}; expected ({num_classes[key]},)")
            class_weight[key] = torch.as_tensor(class_weights(counts, cw), dtype=torch.float32)

    gradnorm = None
    gn = spec.gradnorm
    if gn.enabled:
        for key in task_keys:
            if weights[key] <= 0:
                raise ConfigError(
                    f"MODEL.CLASSIFICATION.HEADS.{key}.LOSS.WEIGHT: GradNorm starts from the static weights, so "
                    f"expected > 0 with LOSS.GRADNORM.ENABLED, got {weights[key]}"
                )
        gradnorm = GradNorm(
            task_keys,
            gn.alpha,
            gn.lr,
            init_weights=[weights[k] for k in task_keys],
            update_interval=gn.update_interval,
            warmup_steps=gn.warmup_steps,
        )
    return TaskLoss(criteria, weights, class_weight, gradnorm)
