"""Inference: export bundles, the Predictor, hierarchy-consistent decoding, polli-typus output and `linnaeus predict`.

Runs are faked in-process: a tiny model is built from the real config + data preparation, its (random) weights are
written where the trainer writes them, and everything downstream is the real code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import write_tiny_dataset
from fake_runs import HEADS, TINY_MODEL, fake_run
from safetensors.torch import load_file, save_file
from typus import ClassificationResult, RankNullCandidate, TaxonCandidate

from linnaeus.aug import eval_transform
from linnaeus.cli import main
from linnaeus.config import load_config, repo_root, save_config
from linnaeus.data import encoders
from linnaeus.data.taxonomy import ClassMap, TaxonomyTree
from linnaeus.errors import ConfigError, DataError
from linnaeus.inference.bundle import BUNDLE_FILES, export_bundle
from linnaeus.inference.decoding import Hierarchy, chain_scores, decode
from linnaeus.inference.evaluate import evaluate_bundle
from linnaeus.inference.predictor import Predictor
from linnaeus.inference.typus_output import ResultBuilder, taxonomy_context

from launch_utils import ensure_demo


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference_tiny")
    ds = write_tiny_dataset(root / "data", per_species=3)
    # The file says how spatial and elevation were encoded, so export reads the encodings instead of assuming them.
    with h5py.File(ds.labels_path, "r+") as f:
        for source in ("spatial", "elevation_broadrange_2"):
            f[source].attrs["column_names"] = list(encoders.COLUMN_NAMES[source])
    cfg = ds.config(*TINY_MODEL, *HEADS)
    data, model = fake_run(cfg, root / "run")
    return {"root": root, "ds": ds, "cfg": cfg, "data": data, "model": model, "run": root / "run"}


@pytest.fixture(scope="module")
def tiny_bundle(tiny_run):
    return export_bundle(tiny_run["run"], tiny_run["root"] / "bundle")


@pytest.fixture(scope="module")
def tiny_predictor(tiny_bundle):
    return Predictor.from_bundle(tiny_bundle, device="cpu")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference_demo")
    demo = ensure_demo(tmp_path_factory.getbasetemp(), per_species=4)
    opts = [
        "DATA.H5.LABELS_PATH", str(demo / "labels.h5"),
        "DATA.HYBRID.IMAGES_DIR", str(demo / "images"),
        "DATA.TAXONOMY_PATH", str(demo / "taxonomy.json"),
        "DATA.NUM_WORKERS", "0",
        "EXPERIMENT.OUTPUT_DIR", str(root / "outputs"),
        *TINY_MODEL,
    ]  # fmt: skip
    cfg = load_config(repo_root() / "configs/experiments/demo.yaml", opts)
    data, model = fake_run(cfg, root / "run", seed=1)
    bundle = export_bundle(root / "run", root / "bundle")
    return {"root": root, "demo": demo, "cfg": cfg, "data": data, "model": model, "bundle": bundle}


def committed(result: ClassificationResult) -> dict[int, int | None]:
    return {
        o.rank_level: (o.resolved_to.match.taxon_id if o.decision == "commit" else None) for o in result.outcomes or []
    }


def assert_chain_in_tree(result: ClassificationResult, tree: TaxonomyTree) -> None:
    chain = committed(result)
    species, genus, family = chain[10], chain[20], chain[30]
    assert family is not None
    if species is not None:
        assert tree.ancestor_at(species, 20) == genus  # None for a species linked straight to its family
        assert tree.ancestor_at(species, 30) == family
    if genus is not None:
        assert tree.parent_of(genus) == family


# ------------------------------------------------------------------------------------------------------ export
def test_export_writes_a_self_contained_bundle(tiny_run, tiny_bundle: Path) -> None:
    for name in BUNDLE_FILES:
        assert (tiny_bundle / name).is_file(), name
    assert not [p for p in tiny_bundle.parent.iterdir() if p.name.startswith(".bundle")]  # temp folder renamed away
    info = json.loads((tiny_bundle / "bundle.json").read_text())
    # No best weights in this run: "best" falls back to the final export.
    assert info["which"] == "final" and info["step"] == 7 and info["format_version"] == 1
    assert info["task_keys_coarse_to_fine"] == ["taxa_L30", "taxa_L20", "taxa_L10"]
    weights = load_file(str(tiny_bundle / "weights.safetensors"))
    expected = tiny_run["model"].state_dict()
    assert weights.keys() == expected.keys()
    assert all(weights[k].dtype == torch.float32 and torch.equal(weights[k], expected[k]) for k in weights)
    pre = json.loads((tiny_bundle / "preprocessing.json").read_text())
    assert pre["image"]["img_size"] == 32 and pre["image"]["val_crop_pct"] == 0.875
    comps = pre["metadata"]["components"]
    assert [c["name"] for c in comps] == ["TEMPORAL", "SPATIAL", "ELEVATION"]  # IDX order
    assert [c["dim"] for c in comps] == [2, 3, 10] and pre["metadata"]["dim"] == 15
    assert comps[2]["scales"] == list(encoders.ELEVATION_SCALES) and comps[0]["columns"] == ["month_sin", "month_cos"]
    maps = json.loads((tiny_bundle / "class_maps.json").read_text())
    first = maps["taxa_L10"]["classes"][0]
    assert first == {"index": 0, "taxon_id": 11, "name": "Apis mellifera", "rank_level": 10, "rank": "species"}
    # Re-exporting replaces a bundle; any other non-empty folder is refused.
    assert export_bundle(tiny_run["run"], tiny_bundle) == tiny_bundle
    other = tiny_run["root"] / "not_a_bundle"
    other.mkdir(exist_ok=True)
    (other / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a bundle folder"):
        export_bundle(tiny_run["run"], other)


def test_export_consolidates_checkpoints_when_no_export_exists(tiny_run, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    sd = load_file(str(run / "export" / "final.safetensors"))
    shutil.rmtree(run / "export")
    ckpt = run / "checkpoints" / "step_5"
    ckpt.mkdir(parents=True)
    # Accelerate saves the wrapped model: DDP's "module." prefix must not reach the bundle.
    save_file({f"module.{k}": v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()},
              str(ckpt / "model.safetensors"))  # fmt: skip
    state = {"step": 5, "best_checkpoints": [{"dir": "step_5", "step": 5, "value": 0.5}]}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    (run / "checkpoints" / "latest").write_text("step_5\n")
    for which in ("best", "final", "step_5"):
        out = export_bundle(run, tmp_path / f"bundle_{which}", which)
        info = json.loads((out / "bundle.json").read_text())
        assert (info["which"], info["step"]) == (which, 5)
        weights = load_file(str(out / "weights.safetensors"))
        assert all(w.dtype == sd[k].dtype for k, w in weights.items())  # fp32 again
        assert all(torch.equal(w, sd[k].to(torch.bfloat16).to(sd[k].dtype)) for k, w in weights.items())
    with pytest.raises(ConfigError, match=r"step_9.*available: \['step_5'\]"):
        export_bundle(run, tmp_path / "b9", "step_9")
    with pytest.raises(ConfigError, match="expected best, final, ema or step_N"):
        export_bundle(run, tmp_path / "bx", "latest")
    assert main(["export", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]) == 2


def test_export_refuses_assumed_metadata_encodings_unless_told(
    tiny_run, tiny_bundle: Path, tmp_path: Path, capsys, caplog
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    labels = tmp_path / "labels.h5"
    shutil.copy(tiny_run["ds"].labels_path, labels)
    with h5py.File(labels, "r+") as f:  # training read these columns from nowhere the bundle can see
        for source in ("spatial", "elevation_broadrange_2"):
            del f[source].attrs["column_names"]
    cfg = load_config(run / "config.yaml", ["DATA.H5.LABELS_PATH", str(labels)])
    save_config(cfg, run / "config.yaml")
    out = tmp_path / "bundle"
    with pytest.raises(ConfigError) as err:
        export_bundle(run, out)
    message = str(err.value)
    assert "\n" not in message and "--assume-encodings" in message
    assert "DATA.META.COMPONENTS.SPATIAL.COLUMNS, DATA.META.COMPONENTS.ELEVATION.COLUMNS: not set" in message
    assert "TEMPORAL" not in message  # its COLUMNS are in the config
    assert not out.exists()
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2
    assert "error: DATA.META.COMPONENTS.SPATIAL.COLUMNS" in capsys.readouterr().err and not out.exists()
    # The labels file unreachable at export time is the same guess.
    labels.unlink()
    with pytest.raises(ConfigError, match="--assume-encodings"):
        export_bundle(run, out)

    with caplog.at_level("WARNING", logger="linnaeus"):
        assert main(["export", "--run", str(run), "--out", str(out), "--assume-encodings"]) == 0
    warned = [r.getMessage() for r in caplog.records if "ASSUMING" in r.getMessage()]
    assert len(warned) == 2 and "SPATIAL" in warned[0] and "ELEVATION" in warned[1]
    info = json.loads((out / "bundle.json").read_text())
    assert info["assumed_metadata_encodings"] == {
        "SPATIAL": {"source": "spatial", "columns": list(encoders.SPATIAL_COLUMNS)},
        "ELEVATION": {
            "source": "elevation_broadrange_2",
            "columns": list(encoders.COLUMN_NAMES["elevation_broadrange_2"]),
        },
    }
    comps = json.loads((out / "preprocessing.json").read_text())["metadata"]["components"]
    assert [c["columns_from"] for c in comps] == ["config COLUMNS", *["built-in default (assumed, not read)"] * 2]
    # An honest export records nothing of the kind.
    honest = json.loads((tiny_bundle / "bundle.json").read_text())
    assert "assumed_metadata_encodings" not in honest


# ------------------------------------------------------------------------------------------------------ predict
def test_predict_cli_writes_one_valid_typus_line_per_image(tiny_run, tiny_bundle: Path, capsys) -> None:
    images = tiny_run["ds"].images_dir
    n = len(list(images.glob("*.jpg")))
    argv = ["predict", "--bundle", str(tiny_bundle), str(images), "--batch-size", "5", "--top-k", "3",
            "--lat", "45.5", "--lon", "-122.6", "--date", "2024-06-01", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == n
    assert "predict" in captured.err  # the progress bar is on stderr, never mixed into the JSON lines
    tree = TaxonomyTree.from_json(tiny_bundle / "taxonomy.json")
    seen_paths = set()
    for line in lines:
        result = ClassificationResult.model_validate_json(line)
        assert result.schema_version == "classification-result.v1" and result.consistency.is_consistent
        assert [r.rank_level for r in result.ranks] == [30, 20, 10]
        seen_paths.add(result.input_context.unit_ids[0])
        assert_chain_in_tree(result, tree)
        for rank, outcome in zip(result.ranks, result.outcomes, strict=True):
            assert len([c for c in rank.candidates if isinstance(c, TaxonCandidate)]) == min(
                3, {30: 2, 20: 3, 10: 7}[rank.rank_level]
            )
            # Taxa are listed by score (issue #16); the decision is in the outcome and always among them.
            scores = [c.score for c in rank.candidates if isinstance(c, TaxonCandidate)]
            assert scores == sorted(scores, reverse=True)
            if outcome.decision == "commit":
                chosen = next(
                    c for c in rank.candidates if getattr(c, "taxon_id", None) == outcome.resolved_to.match.taxon_id
                )
                assert chosen.taxon_snapshot.scientific_name == tree.name_of(chosen.taxon_id)
            else:  # only the skip-level species 17 (no genus) leaves a rank without a class
                assert isinstance(rank.candidates[0], RankNullCandidate) and rank.rank_level == 20
        assert result.provenance.requested_top_k == 3 and result.provenance.producer == "linnaeus"
    assert seen_paths == {str(p) for p in images.glob("*.jpg")}

    # --raw: plain per-rank top-k, no decision policy; --run reads the run folder directly.
    assert main(["predict", "--run", str(tiny_run["run"]), str(images / "img_0000.jpg"), "--raw", "--top-k", "2"]) == 0
    raw = ClassificationResult.model_validate_json(capsys.readouterr().out.strip())
    assert raw.outcomes is None and not raw.provenance.decision_policies
    probs = [c.score for c in raw.ranks[2].candidates]
    assert len(probs) == 2 and probs[0] >= probs[1]

    assert main(["predict", "--bundle", str(tiny_bundle), str(tiny_run["root"] / "missing.jpg")]) == 2
    assert "no such image file or folder" in capsys.readouterr().err
    # Issue 26: one missing path among others costs only its own image (like an unreadable one), reported per image.
    gone = [str(tiny_run["root"] / "gone_1.jpg"), str(tiny_run["root"] / "gone_2.jpg")]
    given = [str(images / "img_0000.jpg"), gone[0], str(images / "img_0002.jpg"), gone[1]]
    assert main(["predict", "--bundle", str(tiny_bundle), *given]) == 1
    captured = capsys.readouterr()
    predicted = [ClassificationResult.model_validate_json(line) for line in captured.out.strip().splitlines()]
    assert [r.input_context.unit_ids[0] for r in predicted] == [given[0], given[2]]
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {g}: no such image file or folder" for g in gone]
    assert main(["predict", "--bundle", str(tiny_bundle), str(images), "--lat", "45"]) == 2
    assert "--lat/--lon: give both" in capsys.readouterr().err
    assert main(["predict", "--bundle", str(tiny_bundle), str(images), "--date", "June"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --lat/--lon/--date/--elevation: metadata TEMPORAL") and err.count("\n") == 1
    assert main(["predict", "--bundle", str(tiny_run["run"]), str(images)]) == 2  # a run folder is not a bundle
    assert "expected a folder written by `linnaeus export`" in capsys.readouterr().err


def test_predictions_are_batched_and_metadata_may_be_missing(tiny_run, tiny_predictor: Predictor) -> None:
    from linnaeus.commands.inference import collect_images, predict_items

    sizes = []
    hook = tiny_predictor.model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        import io

        out = io.StringIO()
        images = collect_images([str(tiny_run["ds"].images_dir)])
        items = ((image, None) for image in images)
        assert predict_items(tiny_predictor, items, len(images), out, batch_size=10, progress=False) == len(images)
    finally:
        hook.remove()
    assert sizes == [10, 10, len(images) - 20]
    assert len(out.getvalue().splitlines()) == len(images)

    paths = images[:4]
    metadata = [None, {"lat": 12.0}, {"date": "2023-04-05", "elevation": 0.0}, {"latitude": 1, "longitude": 2}]
    results = tiny_predictor.predict(paths, metadata, top_k=2)
    assert len(results) == 4 and all(isinstance(r, ClassificationResult) for r in results)
    assert len(tiny_predictor.predict(paths, {"lat": 1.0, "lon": 2.0})) == 4  # one dict for every image
    # bytes and PIL input go through the same loader
    from PIL import Image

    data = Path(paths[0]).read_bytes()
    by_bytes = tiny_predictor.predict([data], top_k=1)[0]
    assert by_bytes.input_context.unit_ids == ["<bytes:0>"]
    assert committed(by_bytes) == committed(tiny_predictor.predict([paths[0]], top_k=1)[0])
    assert tiny_predictor.predict([Image.open(paths[0])], top_k=1)[0].input_context.unit_ids == ["<image:0>"]


def test_missing_metadata_fields_zero_their_component(tiny_predictor: Predictor) -> None:
    records = [
        {"lat": 45.0, "lon": -120.0, "date": "2024-06-01", "elevation": 0.0},
        None,
        {"lat": 45.0},  # longitude missing: the whole spatial component is missing
        {"date": "", "elevation": 250.0},
        {"elevation": float("nan"), "date": "2024-03-05T10:00:00"},
    ]
    meta, valid = tiny_predictor.encode_metadata(records, len(records))
    meta, valid = meta.numpy(), valid.numpy()
    temporal, spatial, elevation = meta[:, 0:2], meta[:, 2:5], meta[:, 5:15]  # IDX order: TEMPORAL, SPATIAL, ELEVATION
    assert valid.tolist() == [
        [True, True, True],
        [False, False, False],
        [False, False, False],
        [False, False, True],
        [True, False, False],
    ]
    assert not meta[1].any() and not spatial[2].any() and not temporal[3].any() and not elevation[4].any()
    np.testing.assert_array_equal(spatial[0], encoders.encode_spatial([45.0], [-120.0])[0])
    np.testing.assert_array_equal(temporal[0], encoders.encode_temporal(["2024-06-01"])[0])
    np.testing.assert_array_equal(elevation[0], encoders.encode_elevation([0.0])[0])  # sea level is a real value
    np.testing.assert_array_equal(temporal[4], encoders.encode_temporal(["2024-03-05"])[0])
    with pytest.raises(DataError, match="unknown metadata key 'altitude'"):
        tiny_predictor.encode_metadata([{"altitude": 3}], 1)
    with pytest.raises(DataError, match=r"^photo\.jpg: metadata SPATIAL: .*out of range") as err:
        tiny_predictor.encode_metadata([{"lat": 95.0, "lon": 0.0}], 1, ["photo.jpg"])
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="2 entries for 1 images"):
        tiny_predictor.predict(["a.jpg"], [None, None])


# ------------------------------------------------------------------------------------------- train/serve parity
def test_validation_and_prediction_feed_the_model_identical_tensors(demo_run) -> None:
    data, cfg = demo_run["data"], demo_run["cfg"]
    predictor = Predictor.from_bundle(demo_run["bundle"], device="cpu")
    # Validation: the val dataset (worker-side decode + crop) and the device transform Trainer.validate applies.
    val = data.dataset("val", train=False)
    batch = [val[i] for i in range(len(val))]
    val_images = eval_transform(torch.stack([b["image"] for b in batch]), cfg.AUG.MEAN, cfg.AUG.STD)
    val_meta = torch.stack([b["meta"] for b in batch])
    # Prediction: the val images' paths and their *raw* metadata (labels.h5 raw_* fields), as a user would give them.
    view = data.view("val")
    with h5py.File(data.spec.labels.labels_path, "r") as f:
        raw = {k: f[k][()] for k in ("raw_lat", "raw_lon", "raw_elevation")}
        raw["raw_date_observed"] = f["raw_date_observed"].asstr()[()]
    records = [
        {
            "lat": float(raw["raw_lat"][r]),
            "lon": float(raw["raw_lon"][r]),
            "date": str(raw["raw_date_observed"][r]),
            "elevation": float(raw["raw_elevation"][r]),
        }
        for r in view.rows.tolist()
    ]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = predictor.model.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), args[1].clone())))
    try:
        predictor.predict(data.image_paths("val"), records, batch_size=len(records))
    finally:
        hook.remove()
    assert len(seen) == 1
    assert val_images.shape == (len(val), 3, 32, 32)
    assert torch.equal(seen[0][0], val_images)
    assert torch.equal(seen[0][1], val_meta)
    assert (~data.samples("val", with_paths=False).meta_valid).any()  # the split includes missing metadata


def test_evaluate_bundle_reproduces_validation_top1(demo_run) -> None:
    data, cfg, model = demo_run["data"], demo_run["cfg"], demo_run["model"]
    val = data.dataset("val", train=False)
    batch = [val[i] for i in range(len(val))]
    with torch.no_grad():
        logits = model(
            eval_transform(torch.stack([b["image"] for b in batch]), cfg.AUG.MEAN, cfg.AUG.STD),
            torch.stack([b["meta"] for b in batch]),
        )
    metrics = evaluate_bundle(demo_run["bundle"], data, batch_size=3)
    for key in data.task_keys:
        y = torch.stack([b["targets"][key] for b in batch])
        labelled = y >= 0
        expected = float((logits[key].argmax(1)[labelled] == y[labelled]).float().mean())
        assert metrics[f"{key}/top1"] == pytest.approx(expected, abs=1e-12), key
        assert metrics[f"{key}/count"] == float(labelled.sum())
    assert metrics["samples"] == len(val)
    decoded = evaluate_bundle(demo_run["bundle"], cfg, consistent=True)  # from a Config too
    assert set(decoded) == set(metrics)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_predictor_agrees_with_cpu(demo_run) -> None:
    paths = demo_run["data"].image_paths("val")
    cpu = Predictor.from_bundle(demo_run["bundle"], device="cpu")
    gpu = Predictor.from_bundle(demo_run["bundle"], device="cuda")
    images, meta = cpu.load_images(paths), cpu.encode_metadata(None, len(paths))[0]
    bf16 = gpu.bf16  # on by default where the GPU has bf16
    gpu.bf16 = False  # fp32 on the GPU: the CPU's numbers
    a, b = cpu.log_probs(images, meta), gpu.log_probs(images, meta)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-3)
    assert [committed(r) for r in gpu.predict(paths)] == [committed(r) for r in cpu.predict(paths)]
    if bf16:  # bf16 autocast: close log-probabilities, and the same answers on (nearly) every image
        gpu.bf16 = True
        h = gpu.log_probs(images, meta)
        for key in a:
            torch.testing.assert_close(a[key], h[key], rtol=0.05, atol=0.05)
        ours, cpus = map(committed, gpu.predict(paths)), map(committed, cpu.predict(paths))
        same = [x == y for x, y in zip(ours, cpus, strict=True)]
        assert sum(same) >= 0.98 * len(same)


# ------------------------------------------------------------------------------------------------------ decoding
# family 1 ─ genus 10 (A) ─ species 100, 101 ; genus 11 (B) ─ species 102
# family 2 ─ genus 12 (E) ─ species 103 ; genus 13 (G, no species classes) ; species 104 directly under family 2
NODES = [(1, "family"), (2, "family"), (10, "genus"), (11, "genus"), (12, "genus"), (13, "genus")] + [
    (t, "species") for t in (100, 101, 102, 103, 104)
]
EDGES = [(1, 10), (1, 11), (2, 12), (2, 13), (10, 100), (10, 101), (11, 102), (12, 103), (2, 104)]


def toy_taxonomy() -> tuple[dict[str, ClassMap], TaxonomyTree]:
    tree = TaxonomyTree.from_dict(
        {
            "nodes": [{"id": t, "rank": r, "name": f"T{t}"} for t, r in NODES],
            "edges": [{"source": s, "target": t} for s, t in EDGES],
        }
    )
    ids = {"taxa_L30": [1, 2], "taxa_L20": [10, 11, 12, 13], "taxa_L10": [100, 101, 102, 103, 104]}
    maps = {k: ClassMap.from_ids(k, [np.array(v)], tree) for k, v in ids.items()}
    return maps, tree


def log_probs(fam, gen, sp) -> dict[str, torch.Tensor]:
    def lp(p):
        t = torch.tensor([p], dtype=torch.float64) + 1e-9
        return (t / t.sum()).log().float()

    return {"taxa_L30": lp(fam), "taxa_L20": lp(gen), "taxa_L10": lp(sp)}


def test_hierarchy_chains_cover_skip_level_and_leaf_ranks() -> None:
    maps, tree = toy_taxonomy()
    h = Hierarchy.build(maps, tree)
    assert h.keys == ("taxa_L30", "taxa_L20", "taxa_L10")
    chains = {tuple(c) for c in h.chains.tolist()}
    # (family, genus, species) class indices; -1 = no class at that rank
    assert chains == {(0, 0, 0), (0, 0, 1), (0, 1, 2), (1, 2, 3), (1, 3, -1), (1, -1, 4)}
    assert h.is_consistent([0, 0, 1]) and not h.is_consistent([0, 1, 1]) and not h.is_consistent([1, 2, 4])


def test_best_chain_beats_per_rank_argmax_and_orders_alternatives_jointly() -> None:
    maps, tree = toy_taxonomy()
    h = Hierarchy.build(maps, tree)
    # Species argmax is 102 (under genus B), but family 1 x genus A x species 100 has the larger joint probability.
    lp = log_probs([0.5, 0.5], [0.6, 0.4, 0.0, 0.0], [0.31, 0.29, 0.4, 0.0, 0.0])
    (d,) = decode(lp, h, top_k=3, consistent=True)
    assert d.chosen() == {"taxa_L30": 0, "taxa_L20": 0, "taxa_L10": 0} and d.consistent
    assert d.chain_probability == pytest.approx(0.5 * 0.6 * 0.31, rel=1e-4)
    species = d.ranks[2]
    assert [c for c, _ in species.candidates] == [0, 1, 2]  # by joint probability: .093, .087, .080
    assert species.candidates[2][1] == pytest.approx(0.4, rel=1e-4)  # scores stay the rank's own probabilities
    assert species.argmax == 2
    (raw,) = decode(lp, h, top_k=3, consistent=False)
    assert raw.chosen() == {"taxa_L30": 0, "taxa_L20": 0, "taxa_L10": 2} and not raw.consistent
    assert [c for c, _ in raw.ranks[2].candidates] == [2, 0, 1]

    builder = ResultBuilder(maps, tree, taxonomy_context(maps, tree, "toy", "1"), {"producer": "test"})
    result = ClassificationResult.model_validate_json(builder.build(d, "x.jpg", 3).to_json())
    outcome = result.outcomes[2]
    assert outcome.adjustment.reason.value == "commit_after_repair"
    assert outcome.adjustment.suppressed_from.match.taxon_id == 102
    assert result.taxonomy_context.root_taxon_ids == [1, 2]
    raw_result = ClassificationResult.model_validate_json(builder.build(raw, "x.jpg", 3).to_json())
    assert raw_result.outcomes is None and not raw_result.consistency.is_consistent


def test_skip_level_and_genus_only_chains_are_reported_with_rank_nulls() -> None:
    maps, tree = toy_taxonomy()
    h = Hierarchy.build(maps, tree)
    builder = ResultBuilder(maps, tree, taxonomy_context(maps, tree, "toy", None), {"producer": "test"})
    # Species 104 hangs directly off family 2: the chain has no genus.
    (d,) = decode(log_probs([0.1, 0.9], [0.3, 0.3, 0.2, 0.2], [0.02, 0.02, 0.02, 0.04, 0.9]), h, top_k=2)
    assert d.chosen() == {"taxa_L30": 1, "taxa_L20": None, "taxa_L10": 4}
    result = ClassificationResult.model_validate_json(builder.build(d, "y.jpg", 2).to_json())
    genus = result.ranks[1]
    assert isinstance(genus.candidates[0], RankNullCandidate)
    assert (
        result.outcomes[1].decision == "abstain"
        and result.outcomes[1].adjustment.reason.value == "abstain_unmapped_taxon"
    )
    assert committed(result) == {30: 2, 20: None, 10: 104}
    # Genus 13 has no species classes: a confident genus-13 image ends its chain at the genus.
    (d,) = decode(log_probs([0.05, 0.95], [0.02, 0.02, 0.06, 0.9], [0.2, 0.2, 0.2, 0.2, 0.2]), h, top_k=2)
    assert d.chosen() == {"taxa_L30": 1, "taxa_L20": 3, "taxa_L10": None}
    result = ClassificationResult.model_validate_json(builder.build(d, "z.jpg", 2).to_json())
    assert committed(result) == {30: 2, 20: 13, 10: None}


def test_decoding_matches_brute_force_over_chains() -> None:
    maps, tree = toy_taxonomy()
    h = Hierarchy.build(maps, tree)
    gen = torch.Generator().manual_seed(0)
    lp = {k: torch.log_softmax(3 * torch.randn(64, len(m), generator=gen), dim=1) for k, m in maps.items()}
    decoded = decode(lp, h, top_k=5)
    for b, d in enumerate(decoded):
        best, best_score = None, -math.inf
        for chain in h.chains.tolist():
            terms = [float(lp[k][b, c]) for k, c in zip(h.keys, chain, strict=True) if c >= 0]
            score = sum(terms) / len(terms)
            if score > best_score:
                best, best_score = chain, score
        assert [(-1 if c is None else c) for c in d.chosen().values()] == best
        assert h.is_consistent(list(d.chosen().values()))
        # Every listed class's best chain ranks no better than the reported one.
        assert all(d.ranks[r].candidates[0][0] == best[r] for r in range(3) if best[r] >= 0)
    total, mean = chain_scores([lp[k] for k in h.keys], torch.as_tensor(h.chains))
    assert total.shape == mean.shape == (64, len(h.chains))


# ------------------------------------------------------------------------------------------- refined heads
REFINED = {"taxa_L20": "HierarchicalSoftmaxHead", "taxa_L10": "ConditionalClassifier"}


def brute_force_chain(lp: dict[str, torch.Tensor], b: int, h: Hierarchy, head_types: dict[str, str]) -> list[int]:
    """The best chain by the corrected score, written out: a rank's probability counts unless the chain's class at
    the next finer rank comes from a refined head (it already contains it); chains compared by the mean."""
    best, best_score = None, -math.inf
    for chain in h.chains.tolist():
        terms = []
        for r, (key, c) in enumerate(zip(h.keys, chain, strict=True)):
            finer_refined = (
                r + 1 < len(chain) and chain[r + 1] >= 0 and head_types.get(h.keys[r + 1]) in set(REFINED.values())
            )
            if c >= 0 and not finer_refined:
                terms.append(float(lp[key][b, c]))
        score = sum(terms) / len(terms)
        if score > best_score:
            best, best_score = chain, score
    return best


@pytest.mark.parametrize(
    "head_types",
    [REFINED, {"taxa_L10": "HierarchicalSoftmaxHead"}, {"taxa_L20": "ConditionalClassifier"}],
    ids=["all-refined", "species-refined", "genus-refined"],
)
def test_refined_decoding_matches_brute_force_over_chains(head_types) -> None:
    maps, tree = toy_taxonomy()
    h = Hierarchy.build(maps, tree, head_types)
    assert h.refined == (False, "taxa_L20" in head_types, "taxa_L10" in head_types)
    gen = torch.Generator().manual_seed(1)
    lp = {k: torch.log_softmax(3 * torch.randn(200, len(m), generator=gen), dim=1) for k, m in maps.items()}
    for b, d in enumerate(decode(lp, h, top_k=5)):
        best = brute_force_chain(lp, b, h, head_types)
        assert [(-1 if c is None else c) for c in d.chosen().values()] == best
        assert all(d.ranks[r].candidates[0][0] == best[r] for r in range(3) if best[r] >= 0)


def complete_tree(families: int = 3, genera: int = 3, species: int = 4) -> tuple[dict[str, ClassMap], TaxonomyTree]:
    nodes, edges, ids = [], [], {"taxa_L30": [], "taxa_L20": [], "taxa_L10": []}
    for f in range(families):
        fid = 1 + f
        nodes.append({"id": fid, "rank": "family", "name": f"F{f}"})
        ids["taxa_L30"].append(fid)
        for g in range(genera):
            gid = 100 + 10 * f + g
            nodes.append({"id": gid, "rank": "genus", "name": f"G{gid}"})
            edges.append({"source": fid, "target": gid})
            ids["taxa_L20"].append(gid)
            for s in range(species):
                sid = 10000 + 100 * gid + s
                nodes.append({"id": sid, "rank": "species", "name": f"S{sid}"})
                edges.append({"source": gid, "target": sid})
                ids["taxa_L10"].append(sid)
    tree = TaxonomyTree.from_dict({"nodes": nodes, "edges": edges})
    return {k: ClassMap.from_ids(k, [np.array(v)], tree) for k, v in ids.items()}, tree


@pytest.mark.parametrize("species_head", ["HierarchicalSoftmaxHead", "ConditionalClassifier"])
def test_refined_decoding_equals_the_refined_argmax_when_it_is_consistent(species_head) -> None:
    from linnaeus.inference.bundle import hierarchy_matrices
    from linnaeus.models import HierarchicalClassifier
    from linnaeus.specs.model import HeadSpec

    maps, tree = complete_tree()
    keys = list(maps)
    head_types = {"taxa_L30": "LinearHead", "taxa_L20": "HierarchicalSoftmaxHead", "taxa_L10": species_head}
    torch.manual_seed(0)
    clf = HierarchicalClassifier(
        8,
        keys,
        {k: len(m) for k, m in maps.items()},
        {k: HeadSpec(type=t) for k, t in head_types.items()},
        hierarchy_matrices(keys, maps, tree),
    ).eval()
    with torch.no_grad():
        for head in clf.heads.values():
            head.fc.weight.mul_(60.0)
        lp = {k: torch.log_softmax(v, dim=1) for k, v in clf(torch.randn(2000, 8)).items()}
    h = Hierarchy.build(maps, tree, head_types)
    argmax = torch.stack([lp[k].argmax(dim=1) for k in h.keys], dim=1)
    decoded = decode(lp, h, top_k=3)
    for b, d in enumerate(decoded):
        chosen = list(d.chosen().values())
        # The refined species argmax always heads a consistent chain here (every species has one), and with the
        # finest refined probability as the score it is exactly the decoded chain.
        assert chosen == h.paths[2][int(argmax[b, 2])].tolist()
        assert d.chain_probability == pytest.approx(float(lp["taxa_L10"][b, chosen[2]].exp()), rel=1e-5)
        if h.is_consistent(argmax[b].tolist()):
            assert chosen == argmax[b].tolist()
    # The product of every rank's softmax (the old score) counts genus and family twice and moves away from it.
    product = decode(lp, Hierarchy.build(maps, tree), top_k=1)
    moved = sum(p.ranks[2].chosen != int(argmax[b, 2]) for b, p in enumerate(product))
    assert moved > 0.02 * len(product), moved
    builder = ResultBuilder(maps, tree, taxonomy_context(maps, tree, "toy", "1"), {"producer": "test"})
    result = ClassificationResult.model_validate_json(builder.build(decoded[0], "x.jpg", 3).to_json())
    (policy,) = result.provenance.decision_policies
    assert policy.parameters["chain_score"] == h.chain_score_rule != product[0].chain_score


def test_predict_manifest_gives_each_image_its_own_metadata(tiny_run, tiny_bundle: Path, tmp_path, capsys) -> None:
    """--manifest (CSV or JSONL): per-row metadata reaches the model, same output format, rows streamed in order."""
    images = sorted(tiny_run["ds"].images_dir.glob("*.jpg"))[:5]
    metas = [{"lat": 45.5, "lon": -122.6, "date": "2024-06-01"}, None, {"elevation": 1200.0}, {"date": "2023-01-15"},
             {"lat": -33.9, "lon": 18.4, "date": "2024-12-24", "elevation": 30.0}]  # fmt: skip
    names = {"lat": "latitude", "lon": "longitude", "date": "date", "elevation": "elevation"}
    csv_path = tmp_path / "m.csv"
    rows = ["image,latitude,longitude,date,elevation"]
    for image, meta in zip(images, metas, strict=True):
        m = meta or {}
        rows.append(",".join([os.path.relpath(image, tmp_path), *(str(m.get(k, "")) for k in names)]))
    csv_path.write_text("\n".join(rows) + "\n")
    jsonl_path = tmp_path / "m.jsonl"
    jsonl_path.write_text(
        "\n".join(
            json.dumps({"path": str(i), **{names[k]: v for k, v in (m or {}).items()}})
            for i, m in zip(images, metas, strict=True)
        )
    )
    predictor = Predictor.from_bundle(tiny_bundle, device="cpu")
    expected = [predictor.predict([i], [m], top_k=2)[0] for i, m in zip(images, metas, strict=True)]
    for manifest in (csv_path, jsonl_path):
        argv = ["predict", "--bundle", str(tiny_bundle), "--manifest", str(manifest), "--top-k", "2",
                "--batch-size", "2", "--device", "cpu"]  # fmt: skip
        assert main(argv) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        got = [ClassificationResult.model_validate_json(line) for line in lines]
        assert [g.input_context.unit_ids[0] for g in got] == [str(i) for i in images]
        for g, e in zip(got, expected, strict=True):  # batched with other rows: equal up to float reordering
            g_scores = [c.score for r in g.ranks for c in r.candidates]
            assert g_scores == pytest.approx([c.score for r in e.ranks for c in r.candidates], rel=1e-4, abs=1e-6)
    # metadata changes the answer for the tiny model: the located rows differ from a no-metadata prediction
    plain = predictor.predict([images[4]], None, top_k=2)[0]
    located = [c.score for r in expected[4].ranks for c in r.candidates]
    unlocated = [c.score for r in plain.ranks for c in r.candidates]
    assert any(
        abs(math.log(a) - math.log(b)) > 0.01 for a, b in zip(located, unlocated, strict=True) if a > 0 and b > 0
    )

    bad = tmp_path / "bad.csv"
    bad.write_text("image,latitude,colour\nx.jpg,1,red\n")
    assert main(["predict", "--bundle", str(tiny_bundle), "--manifest", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}:2: unknown column(s) colour; expected image (or path), and optionally " + (
        "latitude/lat, longitude/lon, date, elevation"
    )
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"image": "nowhere.jpg"}) + "\n" + json.dumps({"image": str(images[0])}) + "\n")
    assert main(["predict", "--bundle", str(tiny_bundle), "--manifest", str(missing)]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 1 and "nowhere.jpg: no such image file" in captured.err
