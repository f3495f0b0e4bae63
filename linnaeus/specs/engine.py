"""What the engine's components read: the loop, checkpoints, EMA, freezing, tracking, schedules.

Plain values only. Intervals and ramps that depend on the run's length stay unresolved here (``Period``, ``Ramp``):
the step plan is known only once the data is, and ``linnaeus.engine.schedule`` resolves them against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Period:
    """Every ``steps`` optimizer steps, every ``epochs`` epochs or every ``fraction`` of the run (one set, or none:
    never)."""

    steps: int | None = None
    epochs: float | None = None
    fraction: float | None = None


@dataclass(frozen=True)
class Ramp:
    """A probability, linear from ``start_prob`` at step 0 to ``end_prob`` at the ramp's end."""

    enabled: bool = True
    start_prob: float = 1.0
    end_prob: float = 0.0
    end_steps: int | None = None
    end_fraction: float | None = None


@dataclass(frozen=True)
class LoopSpec:
    """The step arithmetic and what one optimizer step does (TRAIN, DATA.BATCH_SIZE, MISC)."""

    micro_batch: int = 64
    accumulation: int = 1  # TRAIN.ACCUMULATION_STEPS, 0 read as 1
    epochs: float = 50
    max_steps: int | None = None
    clip_grad: float = 5.0  # <= 0: no clipping
    amp_opt_level: str | None = None
    seed: int = 0
    deterministic: bool = False
    log_every: int = 10  # SCHEDULE.METRICS.LOG_INTERVAL_STEPS: one train row of metrics.jsonl


@dataclass(frozen=True)
class NonFiniteSpec:
    mode: str = "stop"  # "stop" | "skip"
    max_skips: int = 10


@dataclass(frozen=True)
class LRSpec:
    name: str = "cosine"  # "cosine" | "wsd" | "constant"
    base_lr: float = 1e-4
    warmup_lr: float = 5e-7
    min_lr: float = 1e-5
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    warmup_fraction: float | None = None
    stable_fraction: float = 0.8
    decay_type: str = "cosine"
    scale_with_batch: bool = False
    reference_batch: int = 512


@dataclass(frozen=True)
class OptimizerSpec:
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    head_lr_multiplier: float = 1.0
    layer_decay: float | None = None


@dataclass(frozen=True)
class SpeedupSpec:
    """``true`` / ``false`` / ``"auto"`` each (``linnaeus.engine.fast_step`` decides ``auto`` per device)."""

    compile: bool | str = "auto"
    channels_last: bool | str = "auto"
    fused_optimizer: bool | str = "auto"


@dataclass(frozen=True)
class OpsSpec:
    """What changes with the step besides the LR: metadata masking, null-label keeping, mixing."""

    meta_active: bool = True
    meta_masking: Ramp = Ramp(start_prob=1.0, end_prob=0.05)
    partial_meta_masking: bool = False
    partial_meta_prob: float = 0.3
    null_masking: Ramp = Ramp(enabled=False, start_prob=0.0, end_prob=1.0)
    mixing: bool = False  # MIXUP or CUTMIX enabled
    mix_prob: Ramp = Ramp(enabled=False, start_prob=1.0, end_prob=0.2)


@dataclass(frozen=True)
class ValidationSpec:
    every: Period = Period(epochs=1)
    mask_meta_every: Period = Period()  # never unless metadata is active
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CheckpointSpec:
    every: Period = Period(epochs=1)
    keep_last: int = 2
    keep_best: int = 1
    best_metric: str = "val/chain_accuracy"
    best_mode: str = "max"
    auto_resume: bool = True
    resume_from: str | None = None
    allow_config_change: bool = False  # TRAIN.RESUME_CONFIG_CHANGE allow
    model_name: str = ""  # recorded in exported weights' metadata
    ema_weights: bool = False  # TRAIN.EMA.ENABLED: checkpoints hold ema.safetensors (a val_ema BEST_METRIC needs it)


@dataclass(frozen=True)
class EmaSpec:
    enabled: bool = False
    decay: float = 0.9998
    warmup: bool = True


@dataclass(frozen=True)
class FreezeSpec:
    freeze_backbone: bool = False
    unfreeze_after: Period = Period()


@dataclass(frozen=True)
class TrackingSpec:
    """EXPERIMENT's tracker keys: ``trackers`` already includes wandb when ``EXPERIMENT.WANDB.ENABLED``."""

    trackers: tuple[str, ...] = ()
    project: str = "linnaeus"
    name: str = "run"
    group: str = "default"
    tags: tuple[str, ...] = ()
    notes: str = ""
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_mode: str | None = None
    wandb_run_id: str | None = None
    wandb_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineSpec:
    """Everything ``linnaeus.engine``'s components need (filled by ``linnaeus.config.resolve_engine``)."""

    loop: LoopSpec = field(default_factory=LoopSpec)
    nonfinite: NonFiniteSpec = field(default_factory=NonFiniteSpec)
    lr: LRSpec = field(default_factory=LRSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    speedups: SpeedupSpec = field(default_factory=SpeedupSpec)
    ops: OpsSpec = field(default_factory=OpsSpec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    ema: EmaSpec = field(default_factory=EmaSpec)
    freeze: FreezeSpec = field(default_factory=FreezeSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
