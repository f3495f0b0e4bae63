"""The real job with ``DATA.DECODE device`` (torchvision's CPU decoder stands in for nvJPEG): it learns the demo
like CPU decode does, and kill -9 + rerun is exact.

The loop logs ``decode_fallbacks`` (images the device decoder handed to the CPU decoder) with each train row.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from launch_utils import (
    final_weights,
    latest_checkpoint,
    launch,
    metrics,
    run_dir,
    signal_tree,
    spawn,
    tiny_opts,
    wait_for,
)

pytestmark = pytest.mark.slow


def test_device_decode_learns_the_demo_like_cpu_decode(demo: Path, tmp_path: Path) -> None:
    results = {}
    for mode in ("cpu", "device"):
        opts = tiny_opts(
            demo,
            tmp_path / mode,
            name=mode,
            DATA__DECODE=mode,
            DATA__NUM_WORKERS=1,
            TRAIN__MAX_STEPS=60,
            SCHEDULE__VALIDATION__INTERVAL="{STEPS: 60}",
        )
        launch(opts)
        run = run_dir(tmp_path / mode, mode)
        train = metrics(run, "train")
        results[mode] = (train, metrics(run, "val")[-1])
    cpu_train, cpu_val = results["cpu"]
    dev_train, dev_val = results["device"]
    # The demo's JPEGs are all device-decodable: nothing fell back, and the loop reports it.
    assert all(row.get("decode_fallbacks") == 0 for row in dev_train), dev_train[-1]
    # Both learn (chance: 1/12 species, 1/2 families) and land close together: only resampling pixels differ.
    assert dev_train[-1]["loss"] < dev_train[0]["loss"] * 0.8
    assert dev_val["taxa_L30/top1"] >= 0.7, dev_val
    assert abs(dev_val["taxa_L10/top1"] - cpu_val["taxa_L10/top1"]) <= 0.15, (dev_val, cpu_val)
    assert abs(dev_train[-1]["loss"] - cpu_train[-1]["loss"]) <= 0.25 * cpu_train[-1]["loss"]


def test_kill_9_then_rerun_is_exact_with_device_decode(demo: Path, tmp_path: Path) -> None:
    common = dict(
        DATA__DECODE="device",
        DATA__NUM_WORKERS=1,
        TRAIN__MAX_STEPS=30,
        SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 5}",
        SCHEDULE__CHECKPOINT__KEEP_LAST_N=10,
    )
    launch(tiny_opts(demo, tmp_path / "a", name="straight", **common), "cpu_ddp")
    straight = final_weights(run_dir(tmp_path / "a", "straight"))

    opts = tiny_opts(demo, tmp_path / "b", name="killed", **common)
    run = run_dir(tmp_path / "b", "killed")
    proc = spawn(opts, "cpu_ddp")
    wait_for(lambda: latest_checkpoint(run) == "step_10", proc)
    signal_tree(proc, signal.SIGKILL)
    proc.communicate()
    assert 30 not in {r["step"] for r in metrics(run, "train")}, "finished before the kill; the test proves nothing"

    launch(opts, "cpu_ddp")
    assert "resumed from step" in (run / "logs" / "train.log").read_text()
    resumed = final_weights(run)
    worst = max(float((resumed[k] - straight[k]).abs().max()) for k in straight)
    assert worst < 1e-5, worst
