"""`linnaeus predict --observations`: one typus result per observation, saying how its photos were combined."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import write_tiny_dataset
from fake_runs import fake_run
from typus import ClassificationResult

from linnaeus.cli import main
from linnaeus.data import encoders
from linnaeus.errors import DataError
from linnaeus.inference.bundle import export_bundle
from linnaeus.inference.observations import observation_log_probs, read_observations
from linnaeus.inference.predictor import Predictor

TINY = [
    "MODEL.IMG_SIZE", "32",
    "DATA.IMG_SIZE", "32",
    "MODEL.DROP_PATH_RATE", "0.0",
    "MODEL.CONVNEXT_STAGES", "{DEPTHS: [1, 1, 1, 1], DIMS: [8, 16, 32, 64]}",
    "MODEL.ROPE_STAGES", "{DEPTHS: [1, 1], DIMS: [32, 64], NUM_HEADS: [2, 2]}",
    "DATA.META.COMPONENTS.ELEVATION.ENABLED", "false",
]  # fmt: skip


def _bundle(root: Path, cfg) -> Path:
    """A run's leftovers with random (sharpened) weights, exported: the real export and predictor downstream."""
    fake_run(cfg, root / "run", step=3)
    return export_bundle(root / "run", root / "bundle")


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("obs_predict")
    ds = write_tiny_dataset(root / "data", per_species=2)
    with h5py.File(ds.labels_path, "r+") as f:  # says how spatial was encoded, so export need not assume it
        f["spatial"].attrs["column_names"] = list(encoders.COLUMN_NAMES["spatial"])
    return ds, _bundle(root, ds.config(*TINY))


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_an_image_model_aggregates_after_its_heads(image_bundle, tmp_path, capsys) -> None:
    ds, bundle = image_bundle
    images = sorted(str(p) for p in ds.images_dir.glob("*.jpg"))
    obs = _write_jsonl(
        tmp_path / "obs.jsonl",
        [
            {"id": "a", "images": images[:2], "metadata": {"lat": 45.5, "lon": -122.6, "date": "2024-06-01"}},
            {"id": 7, "images": [images[2]]},
            {"id": "c", "images": [Path(images[3]).name, images[4], images[5]]},  # relative: next to the file
        ],
    )
    for name in (Path(images[3]).name,):
        (tmp_path / name).write_bytes(Path(images[3]).read_bytes())
    assert main(["predict", "--bundle", str(bundle), "--observations", str(obs), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    results = [ClassificationResult.model_validate_json(line) for line in lines]
    assert [json.loads(line)["observationId"] for line in lines] == ["a", "7", "c"]
    for r, n in zip(results, (2, 1, 3), strict=True):
        ctx = r.input_context
        assert ctx.entity_type == "observation" and ctx.evidence_shape.value == "multi_view_observation"
        assert ctx.unit_count == n == len(ctx.unit_ids)
        assert ctx.aggregation.stage.value == "aggregated_after_heads" and ctx.aggregation.pooling_mode.value == "mean"
        assert r.consistency.is_consistent and r.outcomes
    # One photo: the observation's answer is that photo's answer.
    predictor = Predictor.from_bundle(bundle, device="cpu")
    (single,) = predictor.predict([images[2]], None, 5)
    for mine, theirs in zip(single.ranks, results[1].ranks, strict=True):
        assert [c.taxon_id for c in mine.candidates] == [c.taxon_id for c in theirs.candidates]
        assert [c.score for c in mine.candidates] == pytest.approx([c.score for c in theirs.candidates], abs=1e-6)
    # Several: the mean of the photos' log-probabilities, renormalised.
    (o,) = read_observations(_write_jsonl(tmp_path / "one.jsonl", [{"id": "x", "images": [images[0], images[4]]}]))
    pooled = observation_log_probs(predictor, [o.images], None)
    per_photo = predictor.log_probs(predictor.load_images(list(o.images)), None)
    for key, lp in per_photo.items():
        torch.testing.assert_close(pooled[key][0], torch.log_softmax(lp.mean(0), dim=0))
        assert not torch.allclose(lp[0], lp[1])  # the photos did differ: the mean is not trivially one of them


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("{not json", r"line 1: not JSON"),
        ('{"id": "a"}', r"line 1: 'images' must be a non-empty list of image paths"),
        ('{"id": "a", "images": []}', r"'images' must be a non-empty list"),
        ('{"id": "", "images": ["x.jpg"]}', r"'id' must be a non-empty string or an integer"),
        ('{"id": "a", "images": ["nope.jpg"]}', r"line 1: image .*nope.jpg does not exist"),
        ('{"id": "a", "images": ["x.jpg"], "lat": 4}', r"unknown field\(s\) \['lat'\]"),
        (
            '{"id": "a", "images": ["x.jpg"], "metadata": {"altitude": 4}}',
            r"unknown metadata field\(s\) \['altitude'\]",
        ),
    ],
)
def test_bad_lines_are_one_line_errors(tmp_path, record, expected) -> None:
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=expected) as err:
        read_observations(_write_jsonl(tmp_path / "obs.jsonl", [record]))
    assert "\n" not in str(err.value)


def test_duplicate_ids_and_mixed_inputs_are_refused(image_bundle, tmp_path, capsys) -> None:
    ds, bundle = image_bundle
    image = str(next(ds.images_dir.glob("*.jpg")))
    obs = _write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "images": [image]}, {"id": "1", "images": [image]}])
    with pytest.raises(DataError, match=r"line 2: id '1' was already used on line 1"):
        read_observations(obs)
    assert main(["predict", "--bundle", str(bundle), "--observations", str(obs), image]) == 2
    assert "--observations FILE, not images and --observations" in capsys.readouterr().err
    assert main(["predict", "--bundle", str(bundle)]) == 2
    assert "give image files or folders, --manifest FILE or --observations FILE" in capsys.readouterr().err


def test_a_multi_view_model_pools_before_its_heads(tmp_path, capsys) -> None:
    """A bundle of a model trained on observations records its pooling; predict pools the photos' features."""
    ds = write_tiny_dataset(tmp_path / "data", per_species=2)
    with h5py.File(ds.labels_path, "r+") as f:
        f["spatial"].attrs["column_names"] = list(encoders.COLUMN_NAMES["spatial"])
        f.create_dataset("observation_ids", data=np.arange(len(f["img_identifiers"])) // 2)
    opts = ("DATA.OBSERVATIONS.ENABLED", "true", "MODEL.VIEW_POOLING", "lse", "MODEL.VIEW_POOLING_TEMPERATURE", "2.0")
    bundle = _bundle(tmp_path, ds.config(*TINY, *opts))
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["model"]["view_pooling"] == {"mode": "lse", "temperature": 2.0, "views": 4}
    images = sorted(str(p) for p in ds.images_dir.glob("*.jpg"))
    obs = _write_jsonl(
        tmp_path / "obs.jsonl", [{"id": "a", "images": [images[0], images[4]]}, {"id": "b", "images": [images[1]]}]
    )
    assert main(["predict", "--bundle", str(bundle), "--observations", str(obs), "--device", "cpu"]) == 0
    results = [ClassificationResult.model_validate_json(line) for line in capsys.readouterr().out.strip().splitlines()]
    for r in results:
        agg = r.input_context.aggregation
        assert agg.stage.value == "pooled_before_heads" and agg.pooling_mode.value == "logsumexp"
        assert agg.pooling_temperature == 2.0
    # Pooled before the heads: the model sees both photos' features at once, which is not the mean of its answers.
    predictor = Predictor.from_bundle(bundle, device="cpu")
    (o,) = read_observations(_write_jsonl(tmp_path / "one.jsonl", [{"id": "x", "images": [images[0], images[4]]}]))
    pooled = observation_log_probs(predictor, [o.images], None)
    x = predictor.load_images(list(o.images))
    with torch.no_grad():
        from linnaeus.aug import eval_transform

        feats = predictor.model.backbone(eval_transform(x, predictor.cfg.AUG.MEAN, predictor.cfg.AUG.STD), None)
        logits = predictor.model.head(predictor.model.pooling(feats[None], torch.ones(1, 2, dtype=torch.bool)))
    for key, lp in pooled.items():
        torch.testing.assert_close(lp[0], torch.log_softmax(logits[key][0].float(), dim=0))
