"""Fine-tuning controls the loop applies: optimizer groups (head LR, layer decay, frozen parameters left out) and
when a frozen backbone is unfrozen (``MODEL.UNFREEZE_BACKBONE_AFTER``, resolved to an optimizer step)."""

from __future__ import annotations

from torch import nn

from linnaeus.config import Config
from linnaeus.engine.schedule import StepPlan, interval_steps
from linnaeus.errors import ConfigError
from linnaeus.models.param_groups import param_groups


def optimizer_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """``param_groups`` with the OPTIMIZER keys; frozen parameters are in no group (no optimizer state)."""
    opt = cfg.OPTIMIZER
    return [
        g
        for g in param_groups(model, opt.WEIGHT_DECAY, opt.HEAD_LR_MULTIPLIER, layer_decay=opt.LAYER_DECAY)
        if g["params"]
    ]


def unfreeze_step(cfg: Config, plan: StepPlan) -> int | None:
    """The optimizer step after which the backbone becomes trainable, or None (never / not frozen)."""
    interval = cfg.MODEL.UNFREEZE_BACKBONE_AFTER
    step = interval_steps(interval, plan)
    if step is not None and not cfg.MODEL.FREEZE_BACKBONE:
        raise ConfigError("MODEL.UNFREEZE_BACKBONE_AFTER: set only together with MODEL.FREEZE_BACKBONE: true")
    return step
