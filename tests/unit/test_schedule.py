"""Step-based schedules: LR warmup + cosine / WSD, probability ramps, intervals in steps, epochs or fractions."""

from __future__ import annotations

import itertools

import pytest

from linnaeus.config import load_config
from linnaeus.config.defaults import Interval
from linnaeus.config.resolve_engine import engine_spec, period
from linnaeus.engine.schedule import (
    LRSchedule,
    OpsSchedule,
    StepPlan,
    fires,
    interval_steps,
    plan_steps,
    scaled_base_lr,
)
from linnaeus.errors import ConfigError
from linnaeus.specs.engine import Period

PLAN = StepPlan(steps_per_epoch=10, total_steps=100)


def test_plan_counts_optimizer_steps() -> None:
    cfg = load_config(None, ["TRAIN.EPOCHS", "3", "TRAIN.ACCUMULATION_STEPS", "2", "DATA.BATCH_SIZE", "4"])
    plan = plan_steps(engine_spec(cfg).loop, batches_per_epoch=21, world_size=3)
    assert plan == StepPlan(steps_per_epoch=10, total_steps=30, micro_batch=4, accumulation=2, world_size=3)
    assert plan.global_batch == 24
    assert plan.batches_per_epoch == 20  # whole windows only: the 21st batch is never taken
    cfg = load_config(None, ["TRAIN.MAX_STEPS", "7"])
    assert plan_steps(engine_spec(cfg).loop, batches_per_epoch=21).total_steps == 7


def test_plan_positions_are_a_view_over_steps() -> None:
    plan = StepPlan(steps_per_epoch=10, total_steps=100, micro_batch=4, accumulation=3, world_size=2)
    assert plan.position(0) == (0, 0)
    assert plan.position(7) == (0, 21)  # 7 windows of 3 micro-batches into epoch 0
    assert plan.position(10) == (1, 0)  # an epoch's last step ends it: the next starts fresh
    assert plan.position(25) == (2, 15)
    assert plan.step_for_samples(7 * plan.global_batch + 5) == 7


def test_plan_refuses_accumulation_longer_than_an_epoch() -> None:
    cfg = load_config(None, ["TRAIN.ACCUMULATION_STEPS", "4"])
    with pytest.raises(ConfigError, match=r"TRAIN\.ACCUMULATION_STEPS: 4 micro-batches per optimizer step"):
        plan_steps(engine_spec(cfg).loop, batches_per_epoch=3)


def test_lr_scales_with_the_global_batch() -> None:
    cfg = load_config(
        None,
        ["LR_SCHEDULER.SCALE_WITH_BATCH", "True", "LR_SCHEDULER.BASE_LR", "1e-3", "LR_SCHEDULER.REFERENCE_BS", "512"],
    )
    plan = StepPlan(steps_per_epoch=10, total_steps=100, micro_batch=64, accumulation=2, world_size=8)
    assert scaled_base_lr(engine_spec(cfg).lr, plan) == pytest.approx(2e-3)


def test_warmup_then_cosine_to_min_lr() -> None:
    cfg = load_config(
        None,
        [
            "LR_SCHEDULER.WARMUP_STEPS",
            "10",
            "LR_SCHEDULER.BASE_LR",
            "1e-3",
            "LR_SCHEDULER.MIN_LR",
            "1e-5",
            "LR_SCHEDULER.WARMUP_LR",
            "0",
        ],
    )
    s = LRSchedule(engine_spec(cfg).lr, PLAN, base_lr=1e-3)
    lrs = [s.lr(i) for i in range(100)]
    assert all(a < b for a, b in itertools.pairwise(lrs[:11]))  # rising through warmup
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # then never rising
    assert s.lr(100) == pytest.approx(1e-5)


def test_warmup_stable_decay() -> None:
    cfg = load_config(
        None,
        [
            "LR_SCHEDULER.NAME",
            "wsd",
            "LR_SCHEDULER.WARMUP_STEPS",
            "0",
            "LR_SCHEDULER.STABLE_FRACTION",
            "0.5",
            "LR_SCHEDULER.DECAY_TYPE",
            "linear",
            "LR_SCHEDULER.MIN_LR",
            "0",
        ],
    )
    s = LRSchedule(engine_spec(cfg).lr, PLAN, base_lr=1.0)
    assert s.lr(0) == s.lr(49) == 1.0
    assert s.lr(75) == pytest.approx(0.5)
    assert s.lr(100) == pytest.approx(0.0)


def test_intervals_resolve_and_fire_mid_epoch() -> None:
    assert interval_steps(period(Interval(STEPS=7)), PLAN) == 7
    assert interval_steps(period(Interval(EPOCHS=0.5)), PLAN) == 5
    assert interval_steps(period(Interval(FRACTION=0.25)), PLAN) == 25
    assert interval_steps(period(Interval()), PLAN) is None
    fired = [s for s in range(1, 101) if fires(interval_steps(period(Interval(EPOCHS=0.5)), PLAN), s, PLAN)]
    assert fired[:3] == [5, 10, 15] and fired[-1] == 100
    with pytest.raises(Exception, match="set only one"):
        Interval(STEPS=1, EPOCHS=1)


def test_ramps() -> None:
    cfg = load_config(
        None,
        [
            "SCHEDULE.META_MASKING.START_PROB",
            "1.0",
            "SCHEDULE.META_MASKING.END_PROB",
            "0.0",
            "SCHEDULE.META_MASKING.END_STEPS",
            "50",
        ],
    )
    ops = OpsSchedule(engine_spec(cfg).ops, PLAN)
    assert ops.meta_mask_prob(0) == 1.0
    assert ops.meta_mask_prob(25) == pytest.approx(0.5)
    assert ops.meta_mask_prob(80) == 0.0
    assert ops.null_keep_prob(10) == 0.0  # nulls masked by default
    cfg = load_config(None, ["SCHEDULE.NULL_MASKING.ENABLED", "True", "SCHEDULE.NULL_MASKING.END_FRACTION", "0.5"])
    assert OpsSchedule(engine_spec(cfg).ops, PLAN).null_keep_prob(25) == pytest.approx(0.5)
    cfg = load_config(None, ["DATA.META.ACTIVE", "False"])
    assert OpsSchedule(engine_spec(cfg).ops, PLAN).meta_mask_prob(0) == 0.0
    assert engine_spec(cfg).validation.mask_meta_every == Period()  # no masked validation without metadata
