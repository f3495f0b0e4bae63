"""The main job under real launchers: python -m, accelerate with 2 CPU processes (DDP, ZeRO-2, ZeRO-3), bf16,
gradient accumulation, failures, two machines on loopback, metrics.jsonl and W&B offline."""

from __future__ import annotations

import math
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from launch_utils import ACCELERATE as ACCELERATE_BIN
from launch_utils import ROOT, env, final_weights, launch, metrics, run_dir, tiny_opts, train_cmd

pytestmark = pytest.mark.slow


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run, "train")]


def test_ddp_zero2_zero3_agree_on_the_same_seed(four_step_run) -> None:
    runs = {name: _losses(four_step_run(name)) for name in ("cpu_ddp", "cpu_zero2", "cpu_zero3")}
    ddp = np.array(runs["cpu_ddp"])
    assert len(ddp) == 4 and np.isfinite(ddp).all()
    # Same data, same init, same updates: only reduction order differs (fp32), so agreement is tight.
    np.testing.assert_allclose(runs["cpu_zero2"], ddp, rtol=2e-4)
    np.testing.assert_allclose(runs["cpu_zero3"], ddp, rtol=2e-4)
    log = (four_step_run("cpu_zero3") / "logs" / "train.log").read_text()
    assert "ZeRO stage" in log and "world size" in log and "2 processes" in log


def test_metrics_jsonl_fields_and_run_folder(demo: Path, tmp_path: Path) -> None:
    launch(
        tiny_opts(
            demo,
            tmp_path,
            TRAIN__MAX_STEPS=4,
            SCHEDULE__VALIDATION__INTERVAL="{STEPS: 2}",
            SCHEDULE__VALIDATION__MASK_META_INTERVAL="{STEPS: 4}",
        ),
    )
    run = run_dir(tmp_path)
    rows = metrics(run)
    for r in rows:
        assert (
            isinstance(r["step"], int)
            and isinstance(r["epoch"], float)
            and r["phase"] in {"train", "val", "val_mask_meta"}
        )
    train = metrics(run, "train")
    assert {"loss", "lr", "images_per_sec", "taxa_L10/loss"} <= set(train[0])
    val = metrics(run, "val")
    assert [r["step"] for r in val] == [2, 4]  # fired mid-epoch, at the configured step interval
    for key in (
        "taxa_L10/top1",
        "taxa_L10/top5",
        "taxa_L10/loss",
        "taxa_L20/coverage",
        "chain_accuracy",
        "partial_chain_accuracy",
    ):
        assert key in val[0]
    assert [r["step"] for r in metrics(run, "val_mask_meta")] == [4]
    for name in (
        "config.yaml",
        "class_maps.json",
        "taxonomy.json",
        "stats.json",
        "logs/train.log",
        "export/final.safetensors",
    ):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_4"


# Nothing random that depends on the micro-batch layout (no flips, jitter, erasing, metadata masking), no warmup, and
# a larger Adam eps: Adam divides by sqrt(v)+eps, so with the default eps a parameter whose gradient is ~1e-9 moves by
# ~lr either way and float summation order alone would flip it; a larger eps keeps updates proportional to the
# gradient, which these tests compare.
SAME_STEPS_WHATEVER_THE_LAYOUT = dict(
    TRAIN__MAX_STEPS=3,
    AUG__HFLIP_PROB=0.0,
    AUG__COLOR_JITTER=0.0,
    AUG__RANDOM_ERASE__PROB=0.0,
    SCHEDULE__META_MASKING__ENABLED=False,
    LR_SCHEDULER__WARMUP_FRACTION=0.0,
    OPTIMIZER__EPS=1e-3,
)


def test_gradient_accumulation_equals_the_larger_batch(demo: Path, tmp_path: Path) -> None:
    common = dict(SAME_STEPS_WHATEVER_THE_LAYOUT, DATA__REQUIRE_ALL_RANKS=True)  # all ranks labelled
    launch(tiny_opts(demo, tmp_path, name="accum", DATA__BATCH_SIZE=8, TRAIN__ACCUMULATION_STEPS=2, **common))
    launch(tiny_opts(demo, tmp_path, name="big", DATA__BATCH_SIZE=16, TRAIN__ACCUMULATION_STEPS=1, **common))
    np.testing.assert_allclose(_losses(run_dir(tmp_path, "accum")), _losses(run_dir(tmp_path, "big")), rtol=1e-4)
    a, b = final_weights(run_dir(tmp_path, "accum")), final_weights(run_dir(tmp_path, "big"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst


def test_bf16_on_cpu_with_zero2(demo: Path, tmp_path: Path) -> None:
    launch(tiny_opts(demo, tmp_path, TRAIN__MAX_STEPS=3, TRAIN__AMP_OPT_LEVEL="O1"), "cpu_zero2")
    run = run_dir(tmp_path)
    assert "bf16 (from TRAIN.AMP_OPT_LEVEL)" in (run / "logs" / "train.log").read_text()
    assert all(math.isfinite(x) for x in _losses(run))
    w = final_weights(run)
    assert all(v.dtype == torch.float32 for v in w.values())


def test_uneven_data_does_not_hang_and_a_failing_rank_fails_the_launch(demo: Path, tmp_path: Path) -> None:
    # A batch size that leaves a ragged tail per rank: every rank must still step together.
    launch(
        tiny_opts(demo, tmp_path, name="ragged", DATA__BATCH_SIZE=7, TRAIN__MAX_STEPS=None, TRAIN__EPOCHS=1),
        "cpu_ddp",
        timeout=300,
    )
    # Corrupt an image only the second process reads first: its DataError must end the whole launch non-zero.
    from linnaeus.config import load_config
    from linnaeus.config.resolve_data import data_spec
    from linnaeus.data.loader import EpochSampler
    from linnaeus.data.prepare import prepare_data

    bad = tmp_path / "bad_demo"
    subprocess.run(["cp", "-r", str(demo), str(bad)], check=True)
    opts = tiny_opts(bad, tmp_path, name="fail")
    cfg = load_config(ROOT / "configs/experiments/demo.yaml", opts)
    prepared = prepare_data(data_spec(cfg))
    paths = prepared.image_paths("train")
    sampler = EpochSampler(len(paths), num_replicas=2, rank=1, seed=cfg.MISC.SEED, batch_size=16)
    sampler.set_epoch(0)
    first_rank1 = sampler.epoch_keys()[0][0]
    Path(paths[first_rank1]).write_bytes(b"not a jpeg")
    proc = launch(opts, "cpu_ddp", check=False, timeout=300)
    assert proc.returncode != 0
    assert Path(paths[first_rank1]).name in proc.stderr
    rank_log = run_dir(tmp_path, "fail") / "logs" / "rank1.log"
    assert rank_log.is_file() and Path(paths[first_rank1]).name in rank_log.read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_loopback(demo: Path, tmp_path: Path) -> None:
    port = _free_port()
    opts = tiny_opts(demo, tmp_path, name="multinode", TRAIN__MAX_STEPS=3)
    procs = []
    for rank in (0, 1):
        extra = [
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            "--deepspeed_config_file",
            str(ROOT / "accelerate_configs" / "ds_cpu_zero2.json"),
        ]
        procs.append(
            subprocess.Popen(
                train_cmd(opts, "multi_node_zero2", extra),
                cwd=ROOT,
                env=env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    log = (run_dir(tmp_path, "multinode") / "logs" / "train.log").read_text()
    assert "2 processes" in log and "2 machine(s)" in log
    assert len(metrics(run_dir(tmp_path, "multinode"), "train")) == 3


def test_wandb_offline_writes_a_local_run(demo: Path, tmp_path: Path) -> None:
    opts = tiny_opts(
        demo,
        tmp_path,
        name="wb",
        TRAIN__MAX_STEPS=2,
        EXPERIMENT__WANDB__ENABLED=True,
        EXPERIMENT__WANDB__MODE="offline",
    )
    proc = subprocess.run(
        train_cmd(opts), cwd=ROOT, env={**env(), "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = run_dir(tmp_path, "wb")
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, list(run.iterdir())
    assert len(metrics(run, "train")) == 2  # metrics.jsonl is written whether W&B is on or not


def test_training_from_shards_with_two_processes(demo: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(demo), str(data)], check=True)
    opts = tiny_opts(
        data,
        tmp_path,
        name="shards",
        TRAIN__MAX_STEPS=4,
        DATA__SHARDS__ENABLED=True,
        DATA__SHARDS__DIR=str(shards),
        SCHEDULE__VALIDATION__INTERVAL="{STEPS: 4}",
    )
    cmd = [
        str(Path(ACCELERATE_BIN).with_name("linnaeus")),
        "shard",
        "--cfg",
        str(ROOT / "configs/experiments/demo.yaml"),
        "--out",
        str(shards),
        "--samples-per-shard",
        "40",
        "--workers",
        "1",
        "--opts",
        *opts,
    ]
    subprocess.run(cmd, cwd=ROOT, env=env(), check=True, capture_output=True, text=True, timeout=300)
    launch(opts, "cpu_ddp")
    run = run_dir(tmp_path, "shards")
    assert len(metrics(run, "train")) == 4
    assert metrics(run, "val")[-1]["samples"] > 0
    # labels.h5 stays the source of truth: changing it invalidates the shards, loudly.
    import h5py

    with h5py.File(data / "labels.h5", "r+") as f:
        f["taxa_L30"][0] = f["taxa_L30"][1]
        f["taxa_L30"][1] = f["taxa_L30"][0]
        f.attrs["touched"] = 1
    proc = launch(
        tiny_opts(
            data,
            tmp_path,
            name="shards2",
            TRAIN__MAX_STEPS=2,
            DATA__SHARDS__ENABLED=True,
            DATA__SHARDS__DIR=str(shards),
        ),
        check=False,
    )
    assert proc.returncode != 0
    assert "linnaeus shard" in proc.stderr and "labels.h5" in proc.stderr


def test_gradnorm_moves_task_weights_under_ddp(demo: Path, tmp_path: Path) -> None:
    opts = tiny_opts(
        demo, tmp_path, name="gn", TRAIN__MAX_STEPS=4, LOSS__GRADNORM__ENABLED=True, LOSS__GRADNORM__UPDATE_INTERVAL=1
    )
    launch(opts, "cpu_ddp")
    rows = metrics(run_dir(tmp_path, "gn"), "train")
    keys = ["taxa_L10/weight", "taxa_L20/weight", "taxa_L30/weight"]
    first, last = [rows[0][k] for k in keys], [rows[-1][k] for k in keys]
    assert sum(last) == pytest.approx(3.0, rel=1e-4)  # normalised to the number of tasks
    assert max(abs(a - b) for a, b in zip(first, last, strict=True)) > 1e-4
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_all_ops_schedules_together(demo: Path, tmp_path: Path) -> None:
    """Selective Mixup/CutMix, partial metadata masking, scheduled null keeping and WSD in one run."""
    opts = tiny_opts(
        demo,
        tmp_path,
        name="ops",
        TRAIN__MAX_STEPS=4,
        SCHEDULE__MIX__MIXUP__ENABLED=True,
        SCHEDULE__MIX__CUTMIX__ENABLED=True,
        SCHEDULE__MIX__GROUP_LEVEL="taxa_L20",
        SCHEDULE__MIX__PROB="{ENABLED: True, START_PROB: 1.0, END_PROB: 0.5, END_FRACTION: 1.0}",
        SCHEDULE__META_MASKING__PARTIAL="{ENABLED: True, PROB: 0.5, WHITELIST: [[SPATIAL], [TEMPORAL, ELEVATION]]}",
        SCHEDULE__NULL_MASKING="{ENABLED: True, START_PROB: 0.0, END_PROB: 1.0, END_FRACTION: 1.0}",
        LR_SCHEDULER__NAME="wsd",
        LOSS__CLASS_WEIGHTING__TYPE="capping",
    )
    launch(opts, "cpu_ddp")
    run = run_dir(tmp_path, "ops")
    rows = metrics(run, "train")
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    log = (run / "logs" / "train.log").read_text()
    assert "mix p" in log and "1.00 -> 0.50" in log
    assert "null loss keep p" in log and "0.00 -> 1.00" in log


def _partially_labelled_dataset(root: Path) -> Path:
    """The tiny dataset with about half of its rows labelled only at the family: micro-batches and processes then
    hold very different numbers of labels at species and genus."""
    import h5py
    from conftest import write_tiny_dataset

    ds = write_tiny_dataset(root, per_species=6)
    with h5py.File(ds.labels_path, "r+") as f:
        species, genus = f["taxa_L10"][:], f["taxa_L20"][:]
        family_only = np.arange(len(species)) % 5 < 2
        species[family_only], genus[family_only] = 0, 0
        f["taxa_L10"][:], f["taxa_L20"][:] = species, genus
    return root


def test_step_loss_is_the_mean_over_labelled_samples_whatever_the_layout(tmp_path: Path) -> None:
    """With partial labels, 2 micro-batches x 4 and 2 processes x 4 (DDP and ZeRO-2) take the same optimizer steps
    as one batch of 8: each rank's loss is normalised by its labelled count over the whole step."""
    data = _partially_labelled_dataset(tmp_path / "partial")
    common = dict(SAME_STEPS_WHATEVER_THE_LAYOUT, DATA__BATCH_SIZE_VAL=8)
    launch(tiny_opts(data, tmp_path, name="one", DATA__BATCH_SIZE=8, **common))
    launch(tiny_opts(data, tmp_path, name="accum", DATA__BATCH_SIZE=4, TRAIN__ACCUMULATION_STEPS=2, **common))
    launch(tiny_opts(data, tmp_path, name="ddp", DATA__BATCH_SIZE=4, **common), "cpu_ddp")
    launch(tiny_opts(data, tmp_path, name="zero2", DATA__BATCH_SIZE=4, **common), "cpu_zero2")
    one = final_weights(run_dir(tmp_path, "one"))
    for name in ("accum", "ddp", "zero2"):
        other = final_weights(run_dir(tmp_path, name))
        assert other.keys() == one.keys()
        worst = max(float((other[k] - one[k]).abs().max()) for k in one)
        assert worst < 1e-5, (name, worst)
        np.testing.assert_allclose(_losses(run_dir(tmp_path, name)), _losses(run_dir(tmp_path, "one")), rtol=1e-4)
