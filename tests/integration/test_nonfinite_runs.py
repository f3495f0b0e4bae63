"""No silent NaN runs, for real: an overflowing LR stops the job at that step with one line and no export (single
process and ZeRO-2); skip mode drops poisoned steps, counts them and finishes; `.inf` is refused before anything runs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from launch_utils import final_weights, launch, metrics, run_dir, tiny_opts


# ---------------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
@pytest.mark.parametrize("launcher", [None, "cpu_zero2"])
def test_infinite_lr_stops_with_one_line_nonzero_exit_and_no_export(
    demo: Path, tmp_path: Path, launcher: str | None
) -> None:
    # `.inf` itself is refused by the config schema (one line, exit 2); a finite LR that overflows the weights
    # after the first step is what reaches the loop.
    proc = launch(tiny_opts(demo, tmp_path, name="huge", LR_SCHEDULER__BASE_LR=1e30), launcher, check=False)
    # Under DeepSpeed the engine steps inside backward, so the bad step is seen after it; both ranks stop together.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    if launcher is None:
        assert proc.returncode == 3 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    else:  # each rank says it once (the launcher may end the slower rank before it prints); the same line
        assert proc.returncode != 0 and 1 <= len(errors) <= 2 and len(set(errors)) == 1, proc.stderr[-3000:]
    assert "training stopped at step" in errors[0] and "non-finite taxa_L10 loss" in errors[0]
    run = run_dir(tmp_path, "huge")
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
        MISC__SEED=2**32 - 1,  # the largest seed the schema accepts reaches every generator without an overflow
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


def test_infinite_lr_is_refused_before_anything_runs(tmp_path: Path) -> None:
    from launch_utils import DEMO_CFG, PY, ROOT, env

    out = tmp_path / "out"
    proc = subprocess.run(
        [
            PY,
            "-m",
            "linnaeus.train",
            "--cfg",
            str(DEMO_CFG),
            "--opts",
            "LR_SCHEDULER.BASE_LR",
            ".inf",
            "EXPERIMENT.OUTPUT_DIR",
            str(out),
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: LR_SCHEDULER.BASE_LR") and not out.exists()
