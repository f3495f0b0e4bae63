"""No silent NaN runs: a non-finite loss or gradient stops the run at that step with one line and no export, or (in
skip mode) the step is dropped and counted up to a bound. Also the loop's side of absurd config numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from linnaeus.config import load_config
from linnaeus.engine.nonfinite import NonFiniteError, NonFiniteGuard
from linnaeus.engine.schedule import plan_steps
from linnaeus.errors import ConfigError

from launch_utils import final_weights, launch, metrics, run_dir, tiny_opts

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
    with pytest.raises(NonFiniteError) as err:
        guard.check(4, torch.tensor(3.0))
    msg = str(err.value)
    assert "step 5" in msg and "non-finite taxa_L10 loss (and 1 more)" in msg and "\n" not in msg
    assert err.value.exit_code == 3


def test_guard_names_gradients_when_only_the_norm_is_infinite() -> None:
    guard = NonFiniteGuard(KEYS, torch.device("cpu"))
    guard.add(*_losses(1.0))
    with pytest.raises(NonFiniteError, match=r"step 1: non-finite gradients;"):
        guard.check(0, float("inf"))


def test_guard_skips_up_to_the_bound_then_stops_and_keeps_its_count() -> None:
    guard = NonFiniteGuard(KEYS, torch.device("cpu"), mode="skip", max_skips=2)
    for step in range(2):
        guard.add(*_losses(float("inf")))
        assert guard.check(step, None) is True
    guard.add(*_losses(1.0))
    assert guard.check(2, torch.tensor(1.0)) is False  # flags do not leak into the next step
    restored = NonFiniteGuard(KEYS, torch.device("cpu"), mode="skip", max_skips=2)
    restored.load_state_dict(guard.state_dict())
    restored.add(*_losses(1.0, float("nan")))
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite taxa_L20 loss.*after 2 skipped steps"):
        restored.check(3, None)


def test_guard_under_fp16_counts_but_leaves_the_skip_to_the_loss_scaler() -> None:
    guard = NonFiniteGuard(KEYS, torch.device("cpu"), mode="skip", max_skips=5, scaler_skips=True)
    guard.add(*_losses(float("nan")))
    assert guard.check(0, None) is False and guard.skipped == 1


def test_skip_is_refused_where_deepspeed_steps_inside_backward() -> None:
    with pytest.raises(ConfigError, match=r"TRAIN\.NONFINITE: skip"):
        NonFiniteGuard(KEYS, torch.device("cpu"), mode="skip", step_applied_in_backward=True)


@pytest.mark.parametrize("epochs", ["1e400", "1e300"])
def test_endless_epochs_are_one_line(epochs: str) -> None:
    cfg = load_config(None, ["TRAIN.EPOCHS", epochs])
    with pytest.raises(ConfigError, match=r"^TRAIN.EPOCHS: .* expected at most \d+ epochs"):
        plan_steps(cfg, batches_per_epoch=5)


# ---------------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
@pytest.mark.parametrize("launcher", [None, "cpu_zero2"])
def test_infinite_lr_stops_with_one_line_nonzero_exit_and_no_export(
    demo: Path, tmp_path: Path, launcher: str | None
) -> None:
    proc = launch(tiny_opts(demo, tmp_path, name="inf", LR_SCHEDULER__BASE_LR=".inf"), launcher, check=False)
    # Under DeepSpeed the engine steps inside backward, so the bad step is seen after it; both ranks stop together.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    if launcher is None:
        assert proc.returncode == 3 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    else:  # each rank says it once; the launcher's own exit code is its business
        assert proc.returncode != 0 and len(errors) == 2, proc.stderr[-3000:]
    assert "training stopped at step" in errors[0] and "non-finite taxa_L10 loss" in errors[0]
    run = run_dir(tmp_path, "inf")
    assert not (run / "export").exists()
    assert not list((run / "checkpoints").glob("step_*"))  # nothing after the bad step was saved


@pytest.mark.slow
def test_skip_mode_drops_poisoned_steps_counts_them_and_finishes(demo: Path, tmp_path: Path) -> None:
    # Two rows of a metadata source no encoder bounds hold 1e30: every step whose batch holds one goes non-finite.
    labels = tmp_path / "labels.h5"
    shutil.copy(demo / "labels.h5", labels)
    with h5py.File(labels, "r+") as f:
        values = f["spatial"][...]
        values[[3, 40, 77]] = 1e30
        f["custom_spatial"] = values
    steps = 12
    opts = tiny_opts(
        demo,
        tmp_path,
        name="skip",
        DATA__H5__LABELS_PATH=str(labels),
        DATA__META__COMPONENTS__SPATIAL__SOURCE="custom_spatial",
        TRAIN__NONFINITE="skip",
        TRAIN__NONFINITE_MAX_SKIPS=steps,
        TRAIN__MAX_STEPS=steps,
        MISC__SEED=2**70,  # any seed the schema accepts reaches every generator without an overflow
    )
    proc = launch(opts)
    run = run_dir(tmp_path, "skip")
    state = json.loads((run / "checkpoints" / f"step_{steps}" / "trainer_state.json").read_text())
    skipped = state["nonfinite_skipped_steps"]
    warnings = [line for line in proc.stderr.splitlines() if "step skipped" in line]
    assert 1 <= skipped < steps and len(warnings) == skipped
    losses = [r["loss"] for r in metrics(run, "train")]  # one row per step: a skipped step's loss is unknown
    assert len(losses) == steps and sum(not np.isfinite(v) for v in losses) == skipped
    assert all(torch.isfinite(w).all() for w in final_weights(run).values())
