"""Fine-tuning controls the loop applies: optimizer groups (head LR, layer decay, frozen parameters left out), when a
frozen backbone is unfrozen (``MODEL.UNFREEZE_BACKBONE_AFTER``, resolved to an optimizer step), and the frozen
state a checkpoint was written with (so a resume knows whether the optimizer it saved still fits)."""

from __future__ import annotations

from typing import Any

from torch import nn

from linnaeus.engine.schedule import StepPlan, interval_steps
from linnaeus.models.param_groups import param_groups, set_backbone_frozen
from linnaeus.specs.engine import FreezeSpec, OptimizerSpec


def optimizer_groups(model: nn.Module, spec: OptimizerSpec) -> list[dict]:
    """``param_groups`` with the OPTIMIZER keys; frozen parameters are in no group (no optimizer state)."""
    return [
        g
        for g in param_groups(model, spec.weight_decay, spec.head_lr_multiplier, layer_decay=spec.layer_decay)
        if g["params"]
    ]


def unfreeze_step(spec: FreezeSpec, plan: StepPlan) -> int | None:
    """The optimizer step after which the backbone becomes trainable, or None (never / not frozen). That it is set
    only with FREEZE_BACKBONE is a rule of ``linnaeus.config.resolve``."""
    return interval_steps(spec.unfreeze_after, plan) if spec.freeze_backbone else None


class FreezeState:
    """Whether the backbone is frozen at a given step, applied to a freshly built model; checkpointed as
    ``backbone_frozen`` so a resume can tell whether the saved optimizer has the same parameters as the new one.
    Nothing is restored from a checkpoint: the frozen state follows from the step and the saved value, which
    ``apply`` and ``same_optimizer_layout`` read from the resume point (a record, not a restored state)."""

    def __init__(self, spec: FreezeSpec, plan: StepPlan) -> None:
        self.initially_frozen = bool(spec.freeze_backbone)
        self.unfreeze_at = unfreeze_step(spec, plan)
        self.frozen = self.initially_frozen

    def frozen_at(self, step: int) -> bool:
        """Frozen while training step ``step + 1`` (i.e. after ``step`` optimizer steps)?"""
        return self.initially_frozen and (self.unfreeze_at is None or step < self.unfreeze_at)

    def apply(self, model: nn.Module, step: int, saved: dict[str, Any] | None = None) -> None:
        """Set the model's backbone to its state after ``step`` steps (``build_model`` froze it if configured). A
        checkpoint that was saved unfrozen stays unfrozen: a resume that stretches the schedule moves a FRACTION
        or EPOCHS unfreeze point past a backbone that already trains, and must not freeze it again."""
        self.frozen = self.frozen_at(step) and bool((saved or {}).get("backbone_frozen", True))
        if self.initially_frozen and not self.frozen:
            set_backbone_frozen(model, False)

    def due(self, step: int) -> bool:
        return self.frozen and self.unfreeze_at is not None and step >= self.unfreeze_at

    def same_optimizer_layout(self, saved: dict[str, Any]) -> bool:
        """Did the checkpoint's optimizer cover the same parameters as this run's now does?"""
        return bool(saved.get("backbone_frozen", self.initially_frozen)) == self.frozen

    def state_dict(self) -> dict[str, Any]:
        return {"backbone_frozen": self.frozen}
