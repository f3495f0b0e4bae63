"""No silent NaN runs: a non-finite loss or gradient stops the run at that step with one line and no export, or (in
skip mode) the step is dropped and counted up to a bound. Also the loop's side of absurd config numbers."""

from __future__ import annotations

import pytest
import torch

from linnaeus.config import load_config
from linnaeus.config.resolve_engine import engine_spec
from linnaeus.engine.nonfinite import NonFiniteError, NonFiniteGuard
from linnaeus.engine.schedule import plan_steps
from linnaeus.errors import ConfigError
from linnaeus.specs.engine import NonFiniteSpec

KEYS = ["taxa_L10", "taxa_L20"]


def _losses(l10: float, l20: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    per = {"taxa_L10": torch.tensor(l10), "taxa_L20": torch.tensor(l20)}
    return per["taxa_L10"] + per["taxa_L20"], per


def test_guard_stops_naming_the_step_and_the_first_bad_loss() -> None:
    guard = NonFiniteGuard(KEYS, torch.device("cpu"))
    guard.add(*_losses(1.0))
    assert guard.check(0, torch.tensor(3.0)) is False
    guard.add(*_losses(1.0))
    guard.add(*_losses(float("nan")))  # a later micro-batch of the same window
    # Stop mode does not wait for the device inside the step: step 5's flags are read at the next check...
    assert guard.check(4, torch.tensor(3.0)) is False
    guard.add(*_losses(1.0))
    with pytest.raises(NonFiniteError) as err:
        guard.check(5, torch.tensor(3.0))
    msg = str(err.value)
    assert "step 5" in msg and "non-finite taxa_L10 loss (and 1 more)" in msg and "\n" not in msg
    assert err.value.exit_code == 3
    guard.settle()  # the failed step's flags were consumed: nothing is raised twice


def test_guard_settle_reads_the_last_step_before_anything_is_saved() -> None:
    guard = NonFiniteGuard(KEYS, torch.device("cpu"))
    guard.add(*_losses(1.0))
    assert guard.check(0, float("inf")) is False
    with pytest.raises(NonFiniteError, match=r"step 1: non-finite gradients;"):
        guard.settle()  # ...or by settle(), which the loop calls before logging, validating, saving or exporting
    guard.add(*_losses(1.0))
    assert guard.check(1, torch.tensor(1.0)) is False
    guard.settle()  # a finite step settles quietly


def test_after_step_settles_the_guard_before_any_action_that_publishes() -> None:
    from linnaeus.engine.after_step import AfterStep, always, run_after_step

    guard, written = NonFiniteGuard(KEYS, torch.device("cpu")), []
    quiet = AfterStep("in memory", always, lambda s, stop: written.append(("in memory", s)), publishes=False)
    guard.add(*_losses(1.0))
    guard.check(0, torch.tensor(1.0))
    assert run_after_step([quiet], 1, False, guard.settle) == ["in memory"]
    guard.add(*_losses(float("nan")))
    guard.check(1, torch.tensor(1.0))
    assert run_after_step([quiet], 2, False, guard.settle) == ["in memory"]  # nothing published: no host read yet
    # An action added later that writes files says nothing about the guard: by default it publishes.
    new_writer = AfterStep("new writer", always, lambda s, stop: written.append(("new writer", s)))
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite"):
        run_after_step([quiet, new_writer], 2, False, guard.settle)
    assert ("new writer", 2) not in written and ("in memory", 2) in written
    not_due = AfterStep("rare writer", lambda s, stop: stop, lambda s, stop: written.append(("rare", s)))
    assert run_after_step([not_due], 3, False, lambda: written.append(("settled", 3))) == []
    assert ("settled", 3) not in written  # a step where no publishing action is due never reads the flags


def test_guard_reduces_every_step_in_the_same_order_on_every_process() -> None:
    calls: list[list[float]] = []

    def reduce_max(flags: torch.Tensor) -> torch.Tensor:
        calls.append(flags.tolist())
        return flags.clone()

    guard = NonFiniteGuard(KEYS, torch.device("cpu"), reduce_max=reduce_max)
    guard.add(*_losses(float("nan")))
    guard.check(0, torch.tensor(1.0))
    with pytest.raises(NonFiniteError, match="step 1"):
        guard.check(1, torch.tensor(1.0))  # raises before its own collective: every process stops at this call
    assert len(calls) == 1 and calls[0][0] == 1.0


def test_guard_skips_up_to_the_bound_then_stops_and_keeps_its_count() -> None:
    guard = NonFiniteGuard(KEYS, torch.device("cpu"), NonFiniteSpec("skip", 2))
    for step in range(2):
        guard.add(*_losses(float("inf")))
        assert guard.check(step, None) is True and guard.step_dropped
    guard.add(*_losses(1.0))
    assert guard.check(2, torch.tensor(1.0)) is False and not guard.step_dropped  # flags do not leak
    restored = NonFiniteGuard(KEYS, torch.device("cpu"), NonFiniteSpec("skip", 2))
    restored.load_state_dict(guard.state_dict())
    restored.add(*_losses(1.0, float("nan")))
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite taxa_L20 loss.*after 2 skipped steps"):
        restored.check(3, None)


def test_guard_under_fp16_counts_but_leaves_the_skip_to_the_loss_scaler() -> None:
    guard = NonFiniteGuard(KEYS, torch.device("cpu"), NonFiniteSpec("skip", 5), scaler_skips=True)
    guard.add(*_losses(float("nan")))
    assert guard.check(0, None) is False and guard.skipped == 1
    assert guard.step_dropped  # the loop leaves the step's NaN losses out of the logged mean
    guard.add(*_losses(1.0))
    assert guard.check(1, None) is False and not guard.step_dropped


def test_skip_is_refused_where_deepspeed_steps_inside_backward() -> None:
    from linnaeus.config.resolve import cross_key_problems
    from linnaeus.specs.launch import LaunchFacts

    cfg = load_config(None, ["TRAIN.NONFINITE", "skip"])
    inside_backward = LaunchFacts("this launch", deepspeed=True, zero_stage=2, precision="bf16")
    assert [p.split(" (")[0] for p in cross_key_problems(cfg, launch=inside_backward)] == ["TRAIN.NONFINITE"]
    scaler = LaunchFacts("this launch", deepspeed=True, zero_stage=2, precision="fp16")
    assert cross_key_problems(cfg, launch=scaler) == []  # fp16's loss scaler skips such steps itself


def test_endless_epochs_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^TRAIN.EPOCHS \(from --opts\): ") as err:  # inf: refused by the schema
        load_config(None, ["TRAIN.EPOCHS", "1e400"])
    assert "\n" not in str(err.value)
    cfg = load_config(None, ["TRAIN.EPOCHS", "1e300"])  # finite, but no plan has that many steps
    with pytest.raises(ConfigError, match=r"^TRAIN.EPOCHS: .* expected at most \d+ epochs"):
        plan_steps(engine_spec(cfg).loop, batches_per_epoch=5)
