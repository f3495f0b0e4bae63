"""Step-based schedules: learning rate, probability ramps and event intervals.

Training counts optimizer steps; epochs are a view (steps_per_epoch). Every interval given in epochs or fractions is
resolved to steps once at startup, so events fire mid-epoch when due and resume exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from linnaeus.errors import ConfigError
from linnaeus.specs.engine import LoopSpec, LRSpec, OpsSpec, Period, Ramp

DEFAULT_WARMUP_FRACTION = 0.05
DEFAULT_META_MASK_END_FRACTION = 0.5


@dataclass(frozen=True)
class StepPlan:
    """The step arithmetic of a run, computed once: batch sizes, accumulation, epochs as a view over steps.

    Every optimizer step consumes one whole accumulation window (``accumulation`` micro-batches of ``micro_batch``
    samples) on each of ``world_size`` processes; an epoch holds ``steps_per_epoch`` such windows (a tail that cannot
    fill a window is skipped)."""

    steps_per_epoch: int
    total_steps: int
    micro_batch: int = 1
    accumulation: int = 1
    world_size: int = 1

    @property
    def global_batch(self) -> int:
        """Training samples per optimizer step over all processes."""
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch and process that training consumes (whole windows only)."""
        return self.steps_per_epoch * self.accumulation

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, micro-batches of that epoch already consumed) after ``step`` optimizer steps."""
        epoch, steps_in = divmod(step, self.steps_per_epoch)
        return epoch, steps_in * self.accumulation

    def step_for_samples(self, samples: int) -> int:
        """The step of this plan that has consumed ``samples`` training samples (rounded down)."""
        return samples // self.global_batch


def plan_steps(loop: LoopSpec, batches_per_epoch: int, world_size: int = 1) -> StepPlan:
    """The plan for ``batches_per_epoch`` micro-batches per process and epoch (what the training stream yields)."""
    accum = max(1, loop.accumulation)
    if batches_per_epoch < accum:
        raise ConfigError(
            f"TRAIN.ACCUMULATION_STEPS: {accum} micro-batches per optimizer step, but an epoch has only "
            f"{batches_per_epoch} batches of {loop.micro_batch} per process; lower one of them"
        )
    steps_per_epoch = batches_per_epoch // accum
    total = loop.max_steps or _epoch_steps(loop.epochs, steps_per_epoch)
    return StepPlan(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        micro_batch=loop.micro_batch,
        accumulation=accum,
        world_size=world_size,
    )


MAX_PLAN_STEPS = 2**53  # far beyond any real run; past it step counts stop being exact as floats


def _epoch_steps(epochs: float, steps_per_epoch: int) -> int:
    steps = epochs * steps_per_epoch
    if not math.isfinite(steps) or steps > MAX_PLAN_STEPS:
        raise ConfigError(
            f"TRAIN.EPOCHS: {epochs:g} epochs of {steps_per_epoch} optimizer steps is not a plan that can finish; "
            f"expected at most {MAX_PLAN_STEPS // steps_per_epoch} epochs (or set TRAIN.MAX_STEPS)"
        )
    return max(1, math.ceil(steps))


def interval_steps(period: Period, plan: StepPlan) -> int | None:
    """Resolve a period to a number of steps (None = never)."""
    if period.steps is not None:
        return period.steps
    if period.epochs is not None:
        return max(1, round(period.epochs * plan.steps_per_epoch))
    if period.fraction is not None:
        return max(1, round(period.fraction * plan.total_steps))
    return None


def fires(period: int | None, step: int, plan: StepPlan) -> bool:
    """True after optimizer step `step` (1-based) when the event is due; the last step always fires."""
    if period is None:
        return False
    return step % period == 0 or step == plan.total_steps


def ramp_end_steps(ramp: Ramp, plan: StepPlan, default_fraction: float = 1.0) -> int:
    if ramp.end_steps is not None:
        return ramp.end_steps
    fraction = ramp.end_fraction if ramp.end_fraction is not None else default_fraction
    return round(fraction * plan.total_steps)


def ramp_value(ramp: Ramp, step: int, plan: StepPlan, default_fraction: float = 1.0, off_value: float = 0.0) -> float:
    """Linear from ``start_prob`` at step 0 to ``end_prob`` at the ramp's end, constant afterwards."""
    if not ramp.enabled:
        return off_value
    end = ramp_end_steps(ramp, plan, default_fraction)
    if end <= 0 or step >= end:
        return ramp.end_prob
    t = step / end
    return ramp.start_prob + t * (ramp.end_prob - ramp.start_prob)


def scaled_base_lr(spec: LRSpec, plan: StepPlan) -> float:
    """BASE_LR, scaled linearly by global batch / REFERENCE_BS when ``LR_SCHEDULER.SCALE_WITH_BATCH``."""
    if not spec.scale_with_batch:
        return spec.base_lr
    return spec.base_lr * plan.global_batch / spec.reference_batch


class LRSchedule:
    """LR per optimizer step: linear warmup from WARMUP_LR, then cosine, warmup-stable-decay or constant. Each param
    group gets it times its own ``lr_scale`` (e.g. the head LR multiplier)."""

    def __init__(self, spec: LRSpec, plan: StepPlan, base_lr: float | None = None) -> None:
        """``base_lr``: default ``scaled_base_lr(spec, plan)``."""
        self.name = spec.name
        self.base_lr = scaled_base_lr(spec, plan) if base_lr is None else base_lr
        self.total = plan.total_steps
        if spec.warmup_steps is not None:
            self.warmup = spec.warmup_steps
        elif spec.warmup_epochs is not None:
            self.warmup = round(spec.warmup_epochs * plan.steps_per_epoch)
        else:
            frac = spec.warmup_fraction if spec.warmup_fraction is not None else DEFAULT_WARMUP_FRACTION
            self.warmup = round(frac * plan.total_steps)
        self.warmup = min(self.warmup, max(0, self.total - 1))
        self.warmup_lr = spec.warmup_lr
        self.min_lr = min(spec.min_lr, self.base_lr)
        self.stable_fraction = spec.stable_fraction
        self.decay_type = spec.decay_type

    def lr(self, step: int) -> float:
        """LR used for optimizer step `step` (0-based count of steps already taken)."""
        if step < self.warmup:
            t = (step + 1) / (self.warmup + 1)
            return self.warmup_lr + t * (self.base_lr - self.warmup_lr)
        if self.name == "constant":
            return self.base_lr
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        if self.name == "wsd":
            if t < self.stable_fraction:
                return self.base_lr
            t = (t - self.stable_fraction) / max(1e-12, 1 - self.stable_fraction)
            if self.decay_type == "linear":
                return self.base_lr + t * (self.min_lr - self.base_lr)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t))


class OpsSchedule:
    """Everything that changes with the step besides the LR: masking ramps, null-label keeping, mix probability."""

    def __init__(self, spec: OpsSpec, plan: StepPlan) -> None:
        self.spec = spec
        self.plan = plan

    def meta_mask_prob(self, step: int) -> float:
        if not self.spec.meta_active:
            return 0.0
        return ramp_value(self.spec.meta_masking, step, self.plan, DEFAULT_META_MASK_END_FRACTION)

    def partial_meta_mask_prob(self, step: int) -> float:
        s = self.spec
        return s.partial_meta_prob if (s.partial_meta_masking and s.meta_active) else 0.0

    def null_keep_prob(self, step: int) -> float:
        """Probability a null-labelled sample stays in that rank's loss (0 = always masked, the default)."""
        return ramp_value(self.spec.null_masking, step, self.plan, 1.0)

    def mix_prob(self, step: int) -> float:
        if not self.spec.mixing:
            return 0.0
        return ramp_value(self.spec.mix_prob, step, self.plan, 1.0, off_value=1.0)

    def summary(self) -> list[tuple[str, str]]:
        last = self.plan.total_steps
        return [
            ("meta masking p", f"{self.meta_mask_prob(0):.2f} -> {self.meta_mask_prob(last):.2f}"),
            ("null loss keep p", f"{self.null_keep_prob(0):.2f} -> {self.null_keep_prob(last):.2f}"),
            ("mix p", f"{self.mix_prob(0):.2f} -> {self.mix_prob(last):.2f}"),
        ]


def period_summary(period: int | None, plan: StepPlan) -> str:
    """A resolved period as the run summary shows it."""
    return "never" if period is None else f"every {period} steps ({period / plan.steps_per_epoch:.2f} epochs)"
