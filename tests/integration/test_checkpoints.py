"""Checkpoints, auto-resume, preemption, retention and export, with real 2-process CPU launches."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

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


def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(demo: Path, tmp_path: Path) -> None:
    common = dict(
        TRAIN__MAX_STEPS=30, SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 5}", SCHEDULE__CHECKPOINT__KEEP_LAST_N=10
    )
    launch(tiny_opts(demo, tmp_path / "a", name="straight", **common), "cpu_ddp")
    straight = final_weights(run_dir(tmp_path / "a", "straight"))

    opts = tiny_opts(demo, tmp_path / "b", name="killed", **common)
    run = run_dir(tmp_path / "b", "killed")
    proc = spawn(opts, "cpu_ddp")
    wait_for(lambda: latest_checkpoint(run) == "step_10", proc)
    signal_tree(proc, signal.SIGKILL)
    proc.communicate()
    steps_before = {r["step"] for r in metrics(run, "train")}
    assert 30 not in steps_before, "the run finished before it could be killed; the test proves nothing"
    saved = latest_checkpoint(run)  # step_10, or a later one written before the kill landed
    assert saved is not None and saved.startswith("step_")
    # A folder left by a kill in the middle of writing must not be mistaken for a checkpoint.
    partial = run / "checkpoints" / ".tmp_step_15"
    partial.mkdir(exist_ok=True)
    (partial / "junk").write_text("half written")

    launch(opts, "cpu_ddp")
    log = (run / "logs" / "train.log").read_text()
    assert f"resumed from step {int(saved.split('_')[1])} " in log, log[-3000:]  # the newest complete checkpoint
    assert not partial.exists()
    resumed = final_weights(run)
    # Same seed, CPU, sample-exact data position and restored RNG: the same weights.
    worst = max(float((resumed[k] - straight[k]).abs().max()) for k in straight)
    assert worst < 1e-5, worst
    # The log and metrics were appended across the restart, not truncated.
    assert log.count("Linnaeus training") == 2
    steps = [r["step"] for r in metrics(run, "train")]
    assert steps[0] == 1 and steps[-1] == 30


def test_sigterm_checkpoints_and_exits_75_then_rerun_continues(demo: Path, tmp_path: Path) -> None:
    opts = tiny_opts(demo, tmp_path, name="term", TRAIN__MAX_STEPS=200, SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 1000}")
    run = run_dir(tmp_path, "term")
    proc = spawn(opts)
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(metrics(run, "train")) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    saved = latest_checkpoint(run)
    assert saved is not None
    step = int(saved.split("_")[1])
    assert 3 <= step < 200
    assert "received SIGTERM" in (run / "logs" / "train.log").read_text()
    launch(tiny_opts(demo, tmp_path, name="term", TRAIN__MAX_STEPS=step + 3))
    assert f"resumed from step {step}" in (run / "logs" / "train.log").read_text()
    assert metrics(run, "train")[-1]["step"] == step + 3


def test_sigterm_on_two_processes(demo: Path, tmp_path: Path) -> None:
    opts = tiny_opts(demo, tmp_path, name="term2", TRAIN__MAX_STEPS=400)
    run = run_dir(tmp_path, "term2")
    proc = spawn(opts, "cpu_zero2")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(metrics(run, "train")) >= 2, proc)
    signal_tree(proc, signal.SIGTERM)
    proc.communicate(timeout=180)
    saved = latest_checkpoint(run)
    assert saved is not None, "no checkpoint after SIGTERM"
    step = int(saved.split("_")[1])
    launch(tiny_opts(demo, tmp_path, name="term2", TRAIN__MAX_STEPS=step + 2), "cpu_zero2")
    assert f"resumed from step {step}" in (run / "logs" / "train.log").read_text()


def test_zero3_export_loads_without_deepspeed_and_reproduces_validation(four_step_run) -> None:
    run = four_step_run("cpu_zero3")  # shared with other tests: read only
    reported = metrics(run, "val")[-1]
    assert reported["step"] == 4  # the validation of the exported (final) weights

    from linnaeus.aug import eval_transform
    from linnaeus.config import load_config
    from linnaeus.config.resolve_data import data_spec
    from linnaeus.config.resolve_model import model_spec
    from linnaeus.data.loader import build_loader
    from linnaeus.data.prepare import prepare_data
    from linnaeus.engine.metrics import ValidationMeter
    from linnaeus.models import build_model

    cfg = load_config(run / "config.yaml")
    data = prepare_data(data_spec(cfg))
    hierarchy = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in data.hierarchy_matrices().items()}
    model = build_model(model_spec(cfg), data.task_keys, data.num_classes, data.meta_dims, hierarchy)
    model.load_state_dict(final_weights(run), strict=True)
    model.eval()
    loader, _ = build_loader(
        data.dataset("val", train=False),
        batch_size=64,
        num_workers=0,
        shuffle=False,
        seed=cfg.MISC.SEED,
        drop_last=False,
        pad=False,
    )
    meter = ValidationMeter(data.task_keys, torch.device("cpu"))
    with torch.no_grad():
        for batch in loader:
            logits = model(eval_transform(batch["image"], cfg.AUG.MEAN, cfg.AUG.STD), batch["meta"])
            meter.update(logits, batch["targets"], batch["is_pad"])
    mine = meter.compute()
    for key in data.task_keys:
        assert mine[f"{key}/top1"] == pytest.approx(reported[f"{key}/top1"], abs=1e-9)
        assert mine[f"{key}/loss"] == pytest.approx(reported[f"{key}/loss"], rel=1e-4)
    assert mine["samples"] == reported["samples"]


def test_retention_keeps_last_k_and_best_m(demo: Path, tmp_path: Path) -> None:
    opts = tiny_opts(
        demo,
        tmp_path,
        name="keep",
        TRAIN__MAX_STEPS=8,
        SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 1}",
        SCHEDULE__VALIDATION__INTERVAL="{STEPS: 1}",
        SCHEDULE__CHECKPOINT__KEEP_LAST_N=2,
        SCHEDULE__CHECKPOINT__KEEP_BEST_N=1,
        SCHEDULE__CHECKPOINT__BEST_METRIC="val/taxa_L30/loss",
        SCHEDULE__CHECKPOINT__BEST_MODE="min",
        LR_SCHEDULER__BASE_LR=0.02,
    )
    launch(opts)
    run = run_dir(tmp_path, "keep")
    val = metrics(run, "val")
    best_step = min(val, key=lambda r: (r["taxa_L30/loss"], r["step"]))["step"]
    expected = {"step_7", "step_8", f"step_{best_step}"}
    kept = {p.name for p in (run / "checkpoints").glob("step_*")}
    assert kept == expected
    assert latest_checkpoint(run) == "step_8"
    assert (run / "export" / "best.safetensors").is_file()


def test_resume_with_another_process_count_restores_weights(demo: Path, four_step_run, tmp_path: Path) -> None:
    shared = four_step_run("cpu_zero2")  # 4 steps of 2 processes x 16 = 32 samples, checkpointed at step 4
    run = run_dir(tmp_path, shared.name)
    shutil.copytree(shared, run)  # the shared run stays as it was; this copy is resumed
    before = final_weights(run)
    launch(tiny_opts(demo, tmp_path, name=shared.name, TRAIN__MAX_STEPS=10))  # one process now, no DeepSpeed
    log = (run / "logs" / "train.log").read_text()
    assert "resumed from step 4" in log and "different process count or ZeRO stage" in log
    # 4 steps x 32 samples = 128 samples = 8 steps of 16: the same point of the data, not the same step number.
    assert "128 samples -> step 8" in log
    assert "optimizer state and RNG restarted" in log
    steps = [r["step"] for r in metrics(run, "train")]
    assert steps[-2:] == [9, 10]
    after = final_weights(run)
    assert before.keys() == after.keys()


@pytest.mark.parametrize("launcher", ["cpu_ddp", "cpu_zero3"])
def test_exported_bundle_reproduces_the_run_validation(four_step_run, tmp_path: Path, launcher: str) -> None:
    from linnaeus.config import load_config
    from linnaeus.inference.bundle import export_bundle
    from linnaeus.inference.evaluate import evaluate_bundle

    run = four_step_run(launcher)  # shared with other tests: read only (the bundle goes to tmp_path)
    reported = metrics(run, "val")[-1]
    assert reported["step"] == 4  # the validation of the exported (final) weights
    bundle = export_bundle(run, tmp_path / "bundle", which="final")
    mine = evaluate_bundle(bundle, load_config(run / "config.yaml"))
    for key in ("taxa_L10", "taxa_L20", "taxa_L30"):
        assert mine[f"{key}/top1"] == pytest.approx(reported[f"{key}/top1"], abs=1e-9), key


def test_every_checkpoint_holds_the_exact_unreadable_image_count(demo: Path, tmp_path: Path) -> None:
    """Counts join the checkpoint at every save, not only on logging steps."""
    import json

    import numpy as np

    from linnaeus.config import load_config
    from linnaeus.config.resolve_data import data_spec
    from linnaeus.data.loader import EpochSampler
    from linnaeus.data.prepare import prepare_data

    from launch_utils import DEMO_CFG

    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(demo), str(data)], check=True)
    opts = tiny_opts(
        data,
        tmp_path,
        name="missing",
        TRAIN__MAX_STEPS=5,
        DATA__HYBRID__ALLOW_MISSING_IMAGES=True,
        DATA__HYBRID__VERIFY_IMAGES__MAX_MISSING_RATIO=0.5,
        SCHEDULE__METRICS__LOG_INTERVAL_STEPS=1000,  # only the last step logs
        SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 2}",
        SCHEDULE__CHECKPOINT__KEEP_LAST_N=5,
    )
    cfg = load_config(DEMO_CFG, opts)
    paths = prepare_data(data_spec(cfg)).image_paths("train")
    gone = np.zeros(len(paths), dtype=bool)
    gone[::7] = True
    for i in np.flatnonzero(gone):
        Path(paths[i]).unlink()
    launch(opts)
    sampler = EpochSampler(len(paths), seed=cfg.MISC.SEED, batch_size=cfg.DATA.BATCH_SIZE)
    sampler.set_epoch(0)
    order = sampler.epoch_keys()[0]
    run = run_dir(tmp_path, "missing")
    for step in (2, 4, 5):
        state = json.loads((run / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())
        expected = int(gone[order[: step * cfg.DATA.BATCH_SIZE]].sum())
        assert state["missing_images"] == expected > 0, step
