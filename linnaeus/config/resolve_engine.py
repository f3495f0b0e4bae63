"""Config → ``EngineSpec``: the one place the engine components' keys are read."""

from __future__ import annotations

from linnaeus.config.defaults import Config, Interval
from linnaeus.config.defaults import Ramp as RampConfig
from linnaeus.specs.engine import (
    CheckpointSpec,
    EmaSpec,
    EngineSpec,
    FreezeSpec,
    LoopSpec,
    LRSpec,
    NonFiniteSpec,
    OpsSpec,
    OptimizerSpec,
    Period,
    Ramp,
    SpeedupSpec,
    TrackingSpec,
    ValidationSpec,
)


def period(interval: Interval) -> Period:
    return Period(steps=interval.STEPS, epochs=interval.EPOCHS, fraction=interval.FRACTION)


def ramp(r: RampConfig) -> Ramp:
    return Ramp(
        enabled=r.ENABLED,
        start_prob=r.START_PROB,
        end_prob=r.END_PROB,
        end_steps=r.END_STEPS,
        end_fraction=r.END_FRACTION,
    )


def engine_spec(cfg: Config) -> EngineSpec:
    t, s = cfg.TRAIN, cfg.SCHEDULE
    return EngineSpec(
        loop=LoopSpec(
            micro_batch=cfg.DATA.BATCH_SIZE,
            accumulation=max(1, t.ACCUMULATION_STEPS),
            epochs=t.EPOCHS,
            max_steps=t.MAX_STEPS,
            clip_grad=t.CLIP_GRAD,
            amp_opt_level=t.AMP_OPT_LEVEL,
            seed=cfg.MISC.SEED,
            deterministic=cfg.MISC.DETERMINISTIC,
            log_every=s.METRICS.LOG_INTERVAL_STEPS,
        ),
        nonfinite=NonFiniteSpec(mode=t.NONFINITE, max_skips=t.NONFINITE_MAX_SKIPS),
        lr=_lr_spec(cfg),
        optimizer=_optimizer_spec(cfg),
        speedups=SpeedupSpec(
            compile=cfg.MODEL.COMPILE, channels_last=cfg.MODEL.CHANNELS_LAST, fused_optimizer=cfg.OPTIMIZER.FUSED
        ),
        ops=_ops_spec(cfg),
        validation=ValidationSpec(
            every=period(s.VALIDATION.INTERVAL),
            mask_meta_every=period(s.VALIDATION.MASK_META_INTERVAL) if cfg.DATA.META.ACTIVE else Period(),
            mean=tuple(cfg.AUG.MEAN),
            std=tuple(cfg.AUG.STD),
        ),
        checkpoint=_checkpoint_spec(cfg),
        ema=EmaSpec(enabled=t.EMA.ENABLED, decay=t.EMA.DECAY, warmup=t.EMA.WARMUP),
        freeze=FreezeSpec(
            freeze_backbone=cfg.MODEL.FREEZE_BACKBONE, unfreeze_after=period(cfg.MODEL.UNFREEZE_BACKBONE_AFTER)
        ),
        tracking=_tracking_spec(cfg),
    )


def _lr_spec(cfg: Config) -> LRSpec:
    sc = cfg.LR_SCHEDULER
    return LRSpec(
        name=sc.NAME,
        base_lr=sc.BASE_LR,
        warmup_lr=sc.WARMUP_LR,
        min_lr=sc.MIN_LR,
        warmup_steps=sc.WARMUP_STEPS,
        warmup_epochs=sc.WARMUP_EPOCHS,
        warmup_fraction=sc.WARMUP_FRACTION,
        stable_fraction=sc.STABLE_FRACTION,
        decay_type=sc.DECAY_TYPE,
        scale_with_batch=sc.SCALE_WITH_BATCH,
        reference_batch=sc.REFERENCE_BS,
    )


def _optimizer_spec(cfg: Config) -> OptimizerSpec:
    o = cfg.OPTIMIZER
    b1, b2 = o.BETAS
    return OptimizerSpec(
        weight_decay=o.WEIGHT_DECAY,
        betas=(b1, b2),
        eps=o.EPS,
        head_lr_multiplier=o.HEAD_LR_MULTIPLIER,
        layer_decay=o.LAYER_DECAY,
    )


def _ops_spec(cfg: Config) -> OpsSpec:
    s = cfg.SCHEDULE
    partial = s.META_MASKING.PARTIAL
    return OpsSpec(
        meta_active=cfg.DATA.META.ACTIVE,
        meta_masking=ramp(s.META_MASKING),
        partial_meta_masking=partial.ENABLED,
        partial_meta_prob=partial.PROB,
        null_masking=ramp(s.NULL_MASKING),
        mixing=s.MIX.MIXUP.ENABLED or s.MIX.CUTMIX.ENABLED,
        mix_prob=ramp(s.MIX.PROB),
    )


def _checkpoint_spec(cfg: Config) -> CheckpointSpec:
    c, t = cfg.SCHEDULE.CHECKPOINT, cfg.TRAIN
    return CheckpointSpec(
        every=period(c.INTERVAL),
        keep_last=c.KEEP_LAST_N,
        keep_best=c.KEEP_BEST_N,
        best_metric=c.BEST_METRIC,
        best_mode=c.BEST_MODE,
        auto_resume=t.AUTO_RESUME,
        resume_from=t.RESUME_FROM,
        allow_config_change=t.RESUME_CONFIG_CHANGE == "allow",
        model_name=cfg.MODEL.NAME,
        ema_weights=t.EMA.ENABLED,
    )


def _tracking_spec(cfg: Config) -> TrackingSpec:
    e = cfg.EXPERIMENT
    w = e.WANDB
    wanted = [str(n).lower() for n in (e.TRACKERS or [])] + (["wandb"] if w.ENABLED else [])
    return TrackingSpec(
        trackers=tuple(wanted),
        project=e.PROJECT,
        name=e.NAME,
        group=e.GROUP,
        tags=tuple(e.TAGS),
        notes=e.NOTES,
        wandb_project=w.PROJECT,
        wandb_entity=w.ENTITY,
        wandb_mode=w.MODE,
        wandb_run_id=w.RUN_ID,
        wandb_tags=tuple(w.TAGS),
    )
