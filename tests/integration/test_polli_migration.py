"""The prior system's own files on real data: its arch files and experiments pass `linnaeus check` with warnings
only and train one epoch (single process, 32 px) on a small labels.h5 + JPEG dataset in the documented schema;
its TaxonomyTree.save() file is a taxonomy source; VERIFY_IMAGES keeps its documented thresholds; `check`
validates loss PARAMS exactly as training does."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TinyDataset, write_tiny_dataset

from linnaeus.cli import main
from linnaeus.config import load_config, repo_root
from linnaeus.config.resolve_data import data_spec
from linnaeus.data.prepare import prepare_data
from linnaeus.data.taxonomy import TaxonomyTree
from linnaeus.errors import DataError

from launch_utils import PY, env, metrics

POLLI = Path(__file__).resolve().parents[1] / "fixtures/polli"
ARCHS = ["mFormerV1_sm", "mFormerV1_md", "mFormerV1_lg", "mFormerV1_xl", "mFormerV0_sm", "mFormerV0_md", "mFormerV0_lg"]
ORDER_ID = 5000  # one order above both families of the tiny dataset
SMALL = [  # hardware, not meaning: 32 px, small batches, no worker processes
    "DATA.IMG_SIZE", "32", "MODEL.IMG_SIZE", "32", "DATA.BATCH_SIZE", "4", "DATA.BATCH_SIZE_VAL", "8",
    "DATA.NUM_WORKERS", "0", "DATA.PIN_MEMORY", "False",
]  # fmt: skip


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyDataset]:
    """The prior system's config tree as the working directory, beside a tiny dataset that also has the 4th rank
    (taxa_L40) and the 'elevation' source its generic example names."""
    root = tmp_path_factory.mktemp("polli")
    shutil.copytree(POLLI / "configs", root / "configs")
    ds = write_tiny_dataset(root / "data", per_species=3)
    with h5py.File(ds.labels_path, "a") as f:
        f["taxa_L40"] = np.where(f["taxa_L30"][()] > 0, ORDER_ID, 0).astype(np.uint32)
        f["elevation"] = f["elevation_broadrange_2"][()]
    return root, ds


def guide_snippet(root: Path, ds: TinyDataset, arch: str) -> Path:
    """The seed guide's experiment (configs/experiments/my_custom_experiment.yaml), paths and class counts set."""
    text = (repo_root() / "configs/experiments/my_custom_experiment.yaml").read_text()
    text = (
        text.replace("/path/to/your/custom_labels.h5", str(ds.labels_path))
        .replace("/path/to/your/custom_image_directory/", str(ds.images_dir))
        .replace("/path/to/your/taxonomy.json", str(ds.taxonomy_path))
        .replace("NUM_CLASSES: 150", "NUM_CLASSES: 7")
        .replace("NUM_CLASSES: 50", "NUM_CLASSES: 3")
        .replace("mFormerV1/mFormerV1_sm.yaml", f"{arch[:9]}/{arch}.yaml")
    )
    path = root / f"configs/experiments/guide_{arch}.yaml"
    path.write_text(text)
    return path


def generic_example(root: Path, ds: TinyDataset) -> Path:
    text = (root / "configs/experiments/generic_mformer_example.yaml").read_text()
    text = (
        text.replace("/path/to/dataset/labels.h5", str(ds.labels_path))
        .replace("/path/to/images", str(ds.images_dir))
        .replace("FILE_EXTENSION: ''", "FILE_EXTENSION: '.jpg'")
        .replace("/path/to/output", str(root / "outputs"))
        # Checkpoint files it names are paths too (not on this machine): start from scratch instead.
        .replace("PRETRAINED_SOURCE: 'stitched_convnext_ropevit'", "PRETRAINED_SOURCE: null")
        .replace("PRETRAINED_CONVNEXT: 'convnext_tiny_22k_1k_384.pth'", "PRETRAINED_CONVNEXT: null")
        .replace("PRETRAINED_ROPEVIT: 'rope_mixed_deit_small_patch16_LS.pth'", "PRETRAINED_ROPEVIT: null")
    )
    path = root / "configs/experiments/generic_here.yaml"
    path.write_text(text)
    return path


def check_json(capsys: pytest.CaptureFixture, cfg: Path, *opts: str) -> tuple[int, dict]:
    rc = main(["check", "--cfg", str(cfg), "--json", "--opts", *opts])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_prior_arch_files_pass_check_with_warnings_only(
    arch: str, checkout, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, ds = checkout
    monkeypatch.chdir(root)
    # The guide's batch of 64 is more than this tiny dataset's training rows, which check reports as training would.
    opts = ("EXPERIMENT.WANDB.ENABLED", "False", "DATA.BATCH_SIZE", "4")
    rc, report = check_json(capsys, guide_snippet(root, ds, arch), *opts)
    assert rc == 0 and report["errors"] == []
    assert any(f"archs/{arch[:9]}/{arch}.yaml): " in w for w in report["warnings"])
    assert report["model"]["name"] == arch


def test_prior_experiments_pass_check_with_warnings_only(
    checkout, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, ds = checkout
    monkeypatch.chdir(root)
    rc, report = check_json(capsys, generic_example(root, ds), *SMALL)
    assert report["errors"] == [] and rc == 0 and len(report["warnings"]) > 50
    assert report["losses"]["types"]["taxa_L40"] == "TaxonomyAwareLabelSmoothing"
    example = root / "configs/experiments/example_experiment.yaml"
    paths = ["DATA.H5.LABELS_PATH", str(ds.labels_path), "DATA.HYBRID.IMAGES_DIR", str(ds.images_dir)]
    rc, report = check_json(capsys, example, *paths, *SMALL)
    assert rc == 0 and report["errors"] == []


def _train(root: Path, cfg: Path, *opts: str) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "linnaeus.train", "--cfg", str(cfg), "--opts", *SMALL, *opts]
    proc = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    return proc


def _trained_one_epoch(run: Path) -> dict:
    train_rows = metrics(run, "train")
    assert train_rows and all(np.isfinite(r["loss"]) for r in train_rows if "loss" in r)
    assert metrics(run, "val")
    return json.loads(json.dumps(load_config(run / "config.yaml").model_dump(mode="json")))


@pytest.mark.slow
def test_prior_generic_example_trains_one_epoch(checkout) -> None:
    root, ds = checkout
    exp = generic_example(root, ds)
    proc = _train(root, exp, "EXPERIMENT.WANDB.ENABLED", "False", "TRAIN.EPOCHS", "1")
    # one summary line for the prior keys (issue 27), not a warning per key; `config validate --verbose` lists them
    summary = [line for line in proc.stderr.splitlines() if "prior-system keys:" in line]
    assert len(summary) == 1 and "read under new names" in summary[0] and "--verbose` lists them" in summary[0]
    assert "LOSS.TASK_SPECIFIC.TRAIN.FUNCS (from configs/experiments/generic_here.yaml): read as" not in proc.stderr
    saved = _trained_one_epoch(root / "outputs/linnaeus/examples/mformerV1_example")
    assert saved["BASE_RESOLVED"] == [str((root / "configs/model/archs/mFormerV1/mFormerV1_sm.yaml").resolve())]
    assert saved["MODEL"]["CLASSIFICATION"]["HEADS"]["taxa_L40"]["LOSS"]["TYPE"] == "TaxonomyAwareLabelSmoothing"


@pytest.mark.slow
def test_prior_minimal_example_trains_one_epoch(checkout) -> None:
    root, ds = checkout
    out = root / "out_example"
    paths = ["DATA.H5.LABELS_PATH", str(ds.labels_path), "DATA.HYBRID.IMAGES_DIR", str(ds.images_dir)]
    _train(root, root / "configs/experiments/example_experiment.yaml", *paths, "EXPERIMENT.OUTPUT_DIR", str(out))
    _trained_one_epoch(out / "linnaeus/default/example_experiment")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mFormerV1_sm", "mFormerV0_sm"])
def test_guide_snippet_with_a_prior_arch_file_trains(arch: str, checkout) -> None:
    root, ds = checkout
    out = root / f"out_{arch}"
    opts = ["EXPERIMENT.WANDB.ENABLED", "False", "TRAIN.EPOCHS", "1", "EXPERIMENT.OUTPUT_DIR", str(out)]
    _train(root, guide_snippet(root, ds, arch), *opts)
    saved = _trained_one_epoch(out / "MyLinnaeusProject/CustomModelTraining/MyFirstCustomRun_mFormerV1_sm")
    assert saved["MODEL"]["NAME"] == arch


def test_check_validates_loss_params_as_training_does(capsys: pytest.CaptureFixture, tiny_dataset) -> None:
    guide_loss = "{TYPE: TaxonomyAwareLabelSmoothing, PARAMS: {label_smoothing: 0.1}}"  # the guide's comment
    opts = ["MODEL.CLASSIFICATION.HEADS", f"{{taxa_L10: {{LOSS: {guide_loss}}}, taxa_L20: {{}}, taxa_L30: {{}}}}"]
    rc = main(["check", "--cfg", str(tiny_dataset.config_path), "--opts", *opts])
    err = capsys.readouterr().err
    expected = "MODEL.CLASSIFICATION.HEADS.taxa_L10.LOSS.PARAMS.label_smoothing: unknown parameter"
    assert rc == 2 and expected in err and "'alpha'" in err
    # Training's loss builder raises the very same line.
    from linnaeus.config.resolve_model import loss_spec
    from linnaeus.errors import ConfigError
    from linnaeus.losses.task_loss import build_task_loss

    cfg = tiny_dataset.config(*opts)
    data = prepare_data(data_spec(cfg), check_images=False)
    with pytest.raises(ConfigError) as exc:
        build_task_loss(loss_spec(cfg), data.task_keys, data.num_classes, data.distance_matrices(), data.class_counts())
    assert str(exc.value) in err


def test_polli_taxonomy_tree_file_is_a_taxonomy_source(tmp_path: Path, tiny_dataset) -> None:
    # The prior system's classes: per task, sorted non-null ids -> 0..K-1 (PARTIAL.LEVELS False).
    keys = ["taxa_L10", "taxa_L20", "taxa_L30"]
    ids = {k: sorted({int(t) for t in tiny_dataset.taxa[k] if t}) for k in keys}
    class_to_idx = {k: {str(t): i for i, t in enumerate(v)} for k, v in ids.items()}
    ours = TaxonomyTree.from_json(tiny_dataset.taxonomy_path)
    raw: dict[str, dict[str, int]] = {}
    for child, parent in (("taxa_L10", "taxa_L20"), ("taxa_L20", "taxa_L30")):
        raw[child] = {}
        for t in ids[child]:
            p = ours.parent.get(t)
            if p in ids[parent]:
                raw[child][str(class_to_idx[child][str(t)])] = class_to_idx[parent][str(p)]
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "taxonomy_tree.json").write_text(
        json.dumps(
            {
                "__taxonomy_tree_version__": "1.0",
                "task_keys": keys,
                "num_classes": {k: len(v) for k, v in ids.items()},
                "hierarchy_map_raw": raw,
                "metadata": {"creation_time": "2025-01-01T00:00:00"},
            }
        )
    )
    with pytest.raises(DataError, match=r"class_to_idx\.json beside it"):
        TaxonomyTree.from_json(assets / "taxonomy_tree.json")
    (assets / "class_to_idx.json").write_text(json.dumps(class_to_idx))
    tree = TaxonomyTree.from_json(assets / "taxonomy_tree.json")
    skip_level = {17}  # species directly under a family: not an adjacent-level link in the prior format
    assert {c: p for c, p in tree.parent.items()} == {c: p for c, p in ours.parent.items() if c not in skip_level}
    # Training from it (ranks whose rows it fully describes: the skip-level species needs our own format).
    opts = ("DATA.TAXONOMY_PATH", str(assets / "taxonomy_tree.json"), "DATA.TASK_KEYS_H5", "[taxa_L20, taxa_L30]")
    data = prepare_data(data_spec(tiny_dataset.config(*opts)), check_images=False)
    assert data.num_classes == {"taxa_L20": 3, "taxa_L30": 2}
    assert data.tree.source == str(assets / "taxonomy_tree.json")


def test_verify_images_leaves_rows_out_within_the_documented_limits(tiny_dataset) -> None:
    tiny_dataset.image_file(4).unlink()
    verify = ["DATA.HYBRID.VERIFY_IMAGES", "{ENABLED: True, MAX_MISSING_RATIO: 0.01, MAX_MISSING_COUNT: 100}"]
    report = "DATA.HYBRID.VERIFY_IMAGES.REPORT_PATH"
    cfg = tiny_dataset.config(*verify, report, "{output_dir}/assets/missing_images_report.json")
    data = prepare_data(data_spec(cfg))
    rows = np.concatenate([data.train.rows, data.val.rows])
    assert 4 not in rows and len(rows) == tiny_dataset.n_rows - 1
    assert data.image_report["excluded_rows"] == 1
    # Rows and image paths stay aligned after the exclusion (the dataset and the shard writer pair them by position).
    for name in ("train", "val"):
        table = data.samples(name)
        for row, path in zip(table.rows, table.paths, strict=True):
            assert Path(path).name.startswith(f"img_{row:04d}"), (row, path)
    # In a job, the main process's verdict is what every process applies (no scan of its own on the others).
    shared = []
    others = prepare_data(
        data_spec(cfg), check_images=False, share=lambda v: shared.append(v) or {"error": None, "bad": []}
    )
    assert shared == [None] and len(np.concatenate([others.train.rows, others.val.rows])) == tiny_dataset.n_rows
    written = cfg.EXPERIMENT.run_folder() / "assets/missing_images_report.json"
    assert json.loads(written.read_text())["items"][0]["row"] == 4
    assert not any(p.name == "{output_dir}" for p in Path.cwd().iterdir())
    # Past the limits it still fails, naming the file.
    with pytest.raises(DataError, match=r"img_0004.jpg \(labels.h5 row 4\)"):
        prepare_data(data_spec(tiny_dataset.config("DATA.HYBRID.VERIFY_IMAGES", "{ENABLED: True}")))
