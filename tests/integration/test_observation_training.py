"""Multi-view training end to end (real launches): one view per observation is image training; a 2-process ZeRO-2
multi-view run killed with kill -9 and rerun equals the uninterrupted run; views pooled before the heads beat the
same backbone scored photo by photo when only one photo of each observation shows the species."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest

from linnaeus.cli import main

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


def _with_one_view_each(demo: Path, root: Path) -> Path:
    """The demo's labels.h5 with observation_ids, one photo per observation (its images and taxonomy stay)."""
    root.mkdir(parents=True, exist_ok=True)
    labels = root / "labels.h5"
    labels.write_bytes((demo / "labels.h5").read_bytes())
    with h5py.File(labels, "r+") as f:
        f.create_dataset("observation_ids", data=np.arange(len(f["img_identifiers"])) * 3 + 1)
    (root / "images").symlink_to(demo / "images")
    (root / "taxonomy.json").write_bytes((demo / "taxonomy.json").read_bytes())
    return root


def test_one_view_per_observation_trains_exactly_like_images(demo: Path, tmp_path: Path) -> None:
    data = _with_one_view_each(demo, tmp_path / "data")
    common = dict(TRAIN__MAX_STEPS=5)
    launch(tiny_opts(data, tmp_path / "a", name="images", **common))
    launch(
        tiny_opts(
            data, tmp_path / "b", name="views", DATA__OBSERVATIONS__ENABLED=True, DATA__OBSERVATIONS__VIEWS=1, **common
        )
    )
    images = [r["loss"] for r in metrics(run_dir(tmp_path / "a", "images"), "train")]
    views = [r["loss"] for r in metrics(run_dir(tmp_path / "b", "views"), "train")]
    assert len(images) == len(views) == 5
    assert max(abs(a - b) for a, b in zip(images, views, strict=True)) < 1e-6, (images, views)
    assert len(set(images)) > 1  # the losses moved: five real steps, not one value repeated


@pytest.fixture(scope="module")
def observation_demo(tmp_path_factory) -> Path:
    from linnaeus.data.demo import write_demo_dataset

    out = tmp_path_factory.mktemp("obs_demo")
    write_demo_dataset(out, seed=0, per_species=30, observations=True)
    return out


def test_zero2_multi_view_kill_9_then_rerun_matches_an_uninterrupted_run(
    observation_demo: Path, tmp_path: Path
) -> None:
    common = dict(
        TRAIN__MAX_STEPS=20,
        DATA__BATCH_SIZE=4,
        DATA__OBSERVATIONS__ENABLED=True,
        DATA__OBSERVATIONS__VIEWS=3,
        MODEL__VIEW_POOLING="attention",
        SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 5}",
        SCHEDULE__CHECKPOINT__KEEP_LAST_N=10,
    )
    launch(tiny_opts(observation_demo, tmp_path / "a", name="straight", **common), "cpu_zero2", timeout=900)
    straight = final_weights(run_dir(tmp_path / "a", "straight"))
    assert any(k.startswith("pooling.") for k in straight)  # the attention pooling trained with the rest

    opts = tiny_opts(observation_demo, tmp_path / "b", name="killed", **common)
    run = run_dir(tmp_path / "b", "killed")
    proc = spawn(opts, "cpu_zero2")
    wait_for(lambda: latest_checkpoint(run) == "step_10", proc, timeout=600)
    signal_tree(proc, signal.SIGKILL)
    proc.communicate()
    assert 20 not in {r["step"] for r in metrics(run, "train")}, "finished before the kill; the test proves nothing"

    launch(opts, "cpu_zero2", timeout=900)
    assert "resumed from step" in (run / "logs" / "train.log").read_text()
    resumed = final_weights(run)
    worst = max(float((resumed[k] - straight[k]).abs().max()) for k in straight)
    assert worst < 1e-5, worst


def test_views_pooled_before_the_heads_beat_the_same_backbone_photo_by_photo(tmp_path: Path) -> None:
    """The species shows in one random photo of each observation: pooling the photos must find it."""
    from benchmarks.observations import detail

    d = detail(tmp_path)
    assert d["per_observation_species_top1"] >= d["per_photo_species_top1"] + 0.10, d
    # `linnaeus evaluate` on the run's own validation split scores the multi-view model per observation exactly as
    # its validation did (every observation has at most VIEWS photos), beside the per-image block; the run ended by
    # calibrating on its pooled answers.
    runs = tmp_path / "out" / "linnaeus_demo" / "cpu"
    assert json.loads((runs / "observations" / "export" / "calibration.json").read_text())["unit"] == "observation"
    out = tmp_path / "eval"
    assert (
        main(["evaluate", "--run", str(runs / "observations"), "--which", "final", "--split", "val", "--out", str(out)])
        == 0
    )
    figs = json.loads((out / "metrics.json").read_text())["metadata"]["on"]
    per_obs = figs["observations"]
    assert per_obs["aggregation"]["stage"] == "pooled_before_heads" and per_obs["left_out_disagreeing_labels"] == 0
    assert per_obs["per_rank"]["taxa_L10"]["top1"] == pytest.approx(d["per_observation_species_top1"], abs=1e-6)
    assert figs["rows"] > per_obs["rows"]  # photos vs observations
