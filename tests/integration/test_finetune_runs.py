"""Pretrained starts in real training runs: a frozen timm ViT under ZeRO-2 (train, export, predict), unfreezing
mid-run, fine-tuning from a previous Linnaeus export with a changed species list, and EMA across a kill -9."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from launch_utils import (
    PY,
    ROOT,
    env,
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

TIMM = dict(MODEL__TYPE="timm", MODEL__NAME="test_vit", MODEL__TIMM__NAME="test_vit")
EMA = dict(TRAIN__EMA="{ENABLED: true, DECAY: 0.8, WARMUP: false}")


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory) -> Path:
    """A timm test_vit with random weights saved as a local file: the stand-in for a downloaded checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_vit.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False, img_size=32).state_dict(), path)
    return path


def _backbone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith("backbone.model.")}


def _optimizer_numel(ckpt: Path) -> int:
    """Elements of fp32 master weights (= Adam moments per moment) over every rank's ZeRO optimizer shard."""
    total = 0
    for shard in sorted((ckpt / "pytorch_model").glob("*optim_states.pt")):
        # A checkpoint this test just wrote (DeepSpeed pickles its optimizer state; not a user-supplied file).
        state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        total += sum(t.numel() for t in state["single_partition_of_fp32_groups"])
    assert total > 0, f"no ZeRO optimizer shards in {ckpt}"
    return total


def _cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [PY, "-m", "linnaeus", *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------------------ frozen timm ViT
def test_frozen_timm_vit_on_zero2_trains_exports_and_predicts(demo: Path, tmp_path: Path, vit_file: Path) -> None:
    opts = tiny_opts(
        demo,
        tmp_path,
        name="frozen",
        **TIMM,
        **EMA,
        MODEL__PRETRAINED=str(vit_file),
        MODEL__FREEZE_BACKBONE=True,
        LR_SCHEDULER__BASE_LR=2e-3,
        SCHEDULE__VALIDATION__INTERVAL="{STEPS: 3}",
        SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 3}",
        SCHEDULE__CHECKPOINT__BEST_METRIC="val_ema/taxa_L20/top1",
    )
    launch(opts, "cpu_zero2")
    run = run_dir(tmp_path, "frozen")
    log = (run / "logs" / "train.log").read_text()
    assert f"pretrained (timm, {vit_file}): stem 2/2, blocks " in log  # the load report at training start

    pretrained = load_file(str(vit_file))
    final = final_weights(run)
    backbone = _backbone(final)
    assert backbone and all(torch.equal(v, pretrained[k.removeprefix("backbone.model.")]) for k, v in backbone.items())
    trainable = sum(v.numel() for k, v in final.items() if k not in backbone)
    # Frozen parameters have no optimizer state: the ZeRO shards hold exactly the trainable ones (plus alignment).
    numel = _optimizer_numel(run / "checkpoints" / "step_6")
    assert trainable <= numel <= trainable + 64, (numel, trainable, sum(v.numel() for v in backbone.values()))

    # EMA: its own validation phase, ranked for best, exported beside final.
    ema_rows = metrics(run, "val_ema")
    assert [r["step"] for r in ema_rows] == [3, 6] and "taxa_L20/top1" in ema_rows[0]
    state = json.loads((run / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert state["best_metric"] == "val_ema/taxa_L20/top1" and state["best_checkpoints"]
    ema = load_file(str(run / "export" / "ema.safetensors"))
    head = "head.heads.taxa_L20.fc.weight"
    assert set(ema) == set(final) and not torch.equal(ema[head], final[head])  # the average lags the weights
    with safe_open(str(run / "export" / "best.safetensors"), "pt") as fh:
        assert fh.metadata()["weights"] == "ema"

    bundle = tmp_path / "bundle"
    _cli("export", "--run", str(run), "--out", str(bundle), "--which", "ema")
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["which"] == "ema" and info["step"] == 6
    served = load_file(str(bundle / "weights.safetensors"))
    assert all(torch.equal(served[k], ema[k]) for k in ema)
    image = sorted((demo / "images").glob("*.jpg"))[0]
    out = _cli("predict", "--bundle", str(bundle), str(image), "--top-k", "2").stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(rows) == 1 and image.name in json.dumps(rows[0])


# ------------------------------------------------------------------------------------------------ unfreezing
def test_unfreeze_after_steps_on_two_processes(demo: Path, tmp_path: Path, vit_file: Path) -> None:
    opts = tiny_opts(
        demo,
        tmp_path,
        name="unfreeze",
        **TIMM,
        MODEL__PRETRAINED=str(vit_file),
        MODEL__FREEZE_BACKBONE=True,
        MODEL__UNFREEZE_BACKBONE_AFTER="{STEPS: 3}",
        SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 3}",
    )
    launch(opts, "cpu_zero2")
    run = run_dir(tmp_path, "unfreeze")
    assert "backbone unfrozen after step 3" in (run / "logs" / "train.log").read_text()
    from linnaeus.engine.checkpoint import consolidated_state_dict

    pretrained = load_file(str(vit_file))
    at_3 = _backbone(consolidated_state_dict(run / "checkpoints" / "step_3"))
    assert all(torch.equal(v, pretrained[k.removeprefix("backbone.model.")]) for k, v in at_3.items())
    final = final_weights(run)
    moved = [k for k, v in _backbone(final).items() if not torch.equal(v, at_3[k])]
    assert len(moved) > len(at_3) // 2, f"only {len(moved)} of {len(at_3)} backbone tensors trained after unfreezing"
    # After the rebuild the optimizer holds every parameter.
    total = sum(v.numel() for v in final.values())
    assert total <= _optimizer_numel(run / "checkpoints" / "step_6") <= total + 64


# ------------------------------------------------------------------------------------------ EMA across kill -9
def test_ema_kill_9_then_rerun_matches_an_uninterrupted_run(demo: Path, tmp_path: Path, vit_file: Path) -> None:
    common = dict(
        **TIMM,
        **EMA,
        MODEL__PRETRAINED=str(vit_file),
        MODEL__FREEZE_BACKBONE=True,
        MODEL__UNFREEZE_BACKBONE_AFTER="{STEPS: 8}",  # the kill lands after the rebuild: its optimizer must resume
        TRAIN__MAX_STEPS=40,
        SCHEDULE__VALIDATION__INTERVAL="{STEPS: 20}",
        SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 5}",
        SCHEDULE__CHECKPOINT__KEEP_LAST_N=10,
    )
    launch(tiny_opts(demo, tmp_path / "a", name="straight", **common))
    straight = run_dir(tmp_path / "a", "straight")

    opts = tiny_opts(demo, tmp_path / "b", name="killed", **common)
    run = run_dir(tmp_path / "b", "killed")
    proc = spawn(opts)
    wait_for(lambda: latest_checkpoint(run) == "step_15", proc)
    signal_tree(proc, signal.SIGKILL)
    proc.communicate()
    assert 40 not in {r["step"] for r in metrics(run, "train")}, "the run finished before it could be killed"
    launch(opts)
    log = (run / "logs" / "train.log").read_text()
    assert any(f"resumed from step {s} " in log for s in range(15, 40, 5)), log[-2000:]

    for name in ("ema.safetensors", "final.safetensors"):
        a, b = load_file(str(straight / "export" / name)), load_file(str(run / "export" / name))
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < 1e-5, (name, worst)
    with safe_open(str(run / "checkpoints" / "step_40" / "ema.safetensors"), "pt") as fh:
        assert fh.metadata()["ema_updates"] == "40"
    assert [r["step"] for r in metrics(run, "val_ema")][-1] == 40
    assert [r["step"] for r in metrics(straight, "val_ema")] == [20, 40]


# ------------------------------------------------------------------------------- fine-tune a Linnaeus export
def _subset(demo: Path, out: Path, drop_species: list[int]) -> Path:
    """The demo dataset without the rows of ``drop_species`` (same images folder and taxonomy)."""
    out.mkdir(parents=True)
    with h5py.File(demo / "labels.h5", "r") as src, h5py.File(out / "labels.h5", "w") as dst:
        keep = ~np.isin(src["taxa_L10"][:], drop_species)
        for name, item in src.items():
            if isinstance(item, h5py.Dataset):
                dst.create_dataset(name, data=item[:][keep])
                dst[name].attrs.update(dict(item.attrs))
            else:
                src.copy(item, dst, name=name)
    return out


def _data_opts(data: Path, demo: Path) -> dict[str, str]:
    return {"DATA__H5__LABELS_PATH": str(data / "labels.h5"), "DATA__HYBRID__IMAGES_DIR": str(demo / "images")}


def test_finetune_from_a_linnaeus_export_with_a_changed_species_list(demo: Path, tmp_path: Path) -> None:
    from linnaeus.data.demo import SPECIES

    ids = [s.id for s in SPECIES]
    old = _subset(demo, tmp_path / "old", drop_species=ids[:2])  # last season: two species unknown
    new = _subset(demo, tmp_path / "new", drop_species=[ids[5]])  # now: those two added, one dropped
    common = dict(**TIMM, LR_SCHEDULER__BASE_LR=3e-3, LR_SCHEDULER__WARMUP_FRACTION=0.0)
    launch(tiny_opts(demo, tmp_path, name="old", TRAIN__MAX_STEPS=60, **common, **_data_opts(old, demo)))
    export = run_dir(tmp_path, "old") / "export" / "final.safetensors"

    # The first validation (after one small step) measures where each run starts.
    first = dict(TRAIN__MAX_STEPS=1, SCHEDULE__VALIDATION__INTERVAL="{STEPS: 1}", **TIMM, **_data_opts(new, demo))
    launch(tiny_opts(demo, tmp_path, name="scratch", **first))
    launch(
        tiny_opts(
            demo, tmp_path, name="tuned", MODEL__PRETRAINED=str(export), MODEL__PRETRAINED_SOURCE="linnaeus", **first
        )
    )
    tuned_run = run_dir(tmp_path, "tuned")

    # Shared taxa keep their head rows: check the weights the fine-tune run started from.
    from linnaeus.config import load_config
    from linnaeus.config.resolve_data import data_spec
    from linnaeus.config.resolve_model import model_spec
    from linnaeus.data.prepare import prepare_data
    from linnaeus.models import build_model

    cfg = load_config(tuned_run / "config.yaml")
    data = prepare_data(data_spec(cfg))
    hierarchy = {k: torch.as_tensor(v) for k, v in data.hierarchy_matrices().items()}
    model = build_model(
        model_spec(cfg), data.task_keys, data.num_classes, data.meta_dims, hierarchy, class_maps=data.class_maps
    )
    before = load_file(str(export))
    old_maps = json.loads((run_dir(tmp_path, "old") / "class_maps.json").read_text())
    old_row = {int(c["taxon_id"]): i for i, c in enumerate(old_maps["taxa_L10"]["classes"])}
    got = model.state_dict()["head.heads.taxa_L10.fc.weight"]
    new_ids = [int(t) for t in data.class_maps["taxa_L10"].taxon_ids]
    assert set(ids[:2]) <= set(new_ids) and ids[5] not in new_ids
    shared = [(i, old_row[t]) for i, t in enumerate(new_ids) if t in old_row]
    assert len(shared) == len(new_ids) - 2
    for i, j in shared:
        assert torch.equal(got[i], before["head.heads.taxa_L10.fc.weight"][j])
    assert "dropped" in (tuned_run / "logs" / "train.log").read_text()

    scratch = metrics(run_dir(tmp_path, "scratch"), "val")[0]
    tuned = metrics(tuned_run, "val")[0]
    assert scratch["step"] == tuned["step"] == 1
    margin = tuned["taxa_L20/top1"] - scratch["taxa_L20/top1"]
    assert margin >= 0.2, (tuned["taxa_L20/top1"], scratch["taxa_L20/top1"])
