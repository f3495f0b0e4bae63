"""`linnaeus evaluate` per observation: beside the per-image figures when the labels file has `observation_ids`,
each observation answered as `linnaeus predict --observations` answers it."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import write_tiny_dataset
from fake_runs import TINY_MODEL, fake_run
from typus import ClassificationResult

from linnaeus.cli import main
from linnaeus.data import encoders
from linnaeus.inference import eval_data, eval_metrics, eval_observations
from linnaeus.inference.bundle import Bundle, export_bundle
from linnaeus.inference.observations import observation_log_probs
from linnaeus.inference.predictor import Predictor

# Observations of 1-3 photos, each within one species' rows (3 per species); the remaining rows are one photo each.
GROUPS = [3, 1, 2, 3, 1, 2, 2, 1, 3]
NO_ELEVATION = ("DATA.META.COMPONENTS.ELEVATION.ENABLED", "false")  # the tiny file does not say its encoding
MIXED = "obs-e"  # one photo of species 14 (row 9); the fixture adds a photo of another species


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A tiny dataset whose rows are grouped into observations; one observation's photos disagree on the species.
    Rows in one observation keep their own (differing) metadata, so pooling must pick the observation's."""
    root = tmp_path_factory.mktemp("eval_obs")
    ds = write_tiny_dataset(root / "data", per_species=3)
    ids = [f"obs-{chr(97 + j)}" for j, size in enumerate(GROUPS) for _ in range(size)]
    ids += [f"single-{i}" for i in range(ds.n_rows - len(ids))]
    species = ds.taxa["taxa_L10"]
    (mixed,) = [i for i, o in enumerate(ids) if o == MIXED]
    other = next(i for i in range(sum(GROUPS), ds.n_rows) if species[i] not in (0, species[mixed]))
    ids[other] = MIXED
    with h5py.File(ds.labels_path, "r+") as f:
        f["spatial"].attrs["column_names"] = list(encoders.COLUMN_NAMES["spatial"])
        f.create_dataset("observation_ids", data=np.asarray(ids, dtype="S"))
    ds.observation_ids = ids
    return ds


def _fake_bundle(root: Path, cfg) -> Path:
    fake_run(cfg, root / "run")
    return export_bundle(root / "run", root / "bundle")


def _evaluate(bundle: Path, ds, out: Path, *extra: str) -> dict:
    argv = ["evaluate", "--bundle", str(bundle), "--labels", str(ds.labels_path), "--images", str(ds.images_dir)]
    assert main([*argv, "--out", str(out), "--device", "cpu", "--batch-size", "4", *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def _expected_top1(lp: dict[str, np.ndarray], evalset, obs, key: str) -> float:
    keep = obs.agree
    y = evalset.table.targets[key][obs.first[keep]]
    return eval_metrics.topk_accuracy(np.exp(lp[key][keep]), y, 1)


def test_an_image_model_is_scored_per_observation_by_averaging_its_photos(labelled, tmp_path) -> None:
    bundle = _fake_bundle(tmp_path, labelled.config(*TINY_MODEL, *NO_ELEVATION))
    metrics = _evaluate(bundle, labelled, tmp_path / "eval", "--metadata", "both", "--save-predictions")
    predictor = Predictor(Bundle.load(bundle), "cpu")
    evalset = eval_data.from_labels(predictor.bundle, labelled.labels_path, labelled.images_dir)
    obs = eval_observations.observations_of(evalset)
    assert obs is not None and len(obs) == len(set(labelled.observation_ids))
    assert metrics["set"]["observations"] == len(obs)
    for mode in ("on", "masked"):
        figs = metrics["metadata"][mode]
        assert figs["rows"] == labelled.n_rows  # the per-image figures are still there, over every photo
        per_obs = figs["observations"]
        assert per_obs["observations"] == len(obs) - 1 and per_obs["left_out_disagreeing_labels"] == 1
        assert per_obs["aggregation"]["stage"] == "aggregated_after_heads"
        _, photos = np.unique(labelled.observation_ids, return_counts=True)
        expected_photos = {"min": 1, "max": 3, "median": float(np.median(photos))}
        assert per_obs["photos_per_observation"] == expected_photos
        # The mean of each observation's photos' log-probabilities, renormalised, computed here from the per-image
        # scores: the figure must be that observation-level accuracy, not the per-image one.
        rows = eval_data.score(predictor, evalset, masked=mode == "masked", progress=False)
        for key in predictor.task_keys:
            sums = np.zeros((len(obs), rows[key].shape[1]))
            np.add.at(sums, obs.owner, rows[key])
            mean = sums / np.bincount(obs.owner)[:, None]
            expected = torch.log_softmax(torch.from_numpy(mean), dim=1).numpy()
            assert per_obs["per_rank"][key]["top1"] == pytest.approx(_expected_top1({key: expected}, evalset, obs, key))
            assert per_obs["per_rank"][key]["count"] == int(
                (evalset.table.targets[key][obs.first[obs.agree]] >= 0).sum()
            )
    lines = (tmp_path / "eval" / "predictions_observations.jsonl").read_text().splitlines()
    assert len(lines) == len(obs) - 1  # obs-e has no single truth and no line
    first = json.loads(lines[0])
    assert first["observationId"] == "obs-a"
    result = ClassificationResult.model_validate_json(lines[0])
    assert result.input_context.evidence_shape.value == "multi_view_observation"
    assert result.input_context.unit_count == 3
    assert result.input_context.aggregation.stage.value == "aggregated_after_heads"
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == labelled.n_rows
    table = (tmp_path / "eval" / "report.html").read_text()
    assert "per observation:" in table and "left out (their photos disagree on a label)" in table


def test_a_multi_view_model_pools_each_observations_photos_in_one_decode_pass(labelled, tmp_path) -> None:
    """Per observation: exactly predict --observations' answer (all photos pooled before the heads, the first row's
    metadata), even when an observation's photos straddle loader batches; per image: each photo alone with its own
    row's metadata, as if the model had no pooling."""
    opts = ("DATA.OBSERVATIONS.ENABLED", "true", "MODEL.VIEW_POOLING", "attention")
    bundle = _fake_bundle(tmp_path, labelled.config(*TINY_MODEL, *NO_ELEVATION, *opts))
    predictor = Predictor(Bundle.load(bundle), "cpu", calibrate=False)
    evalset = eval_data.from_labels(predictor.bundle, labelled.labels_path, labelled.images_dir)
    obs = eval_observations.observations_of(evalset)
    assert obs is not None
    rows, pooled = eval_observations.score_observations(predictor, evalset, obs, batch_size=4, progress=False)
    alone = eval_data.score(predictor, evalset, batch_size=5, progress=False)
    for key in predictor.task_keys:
        np.testing.assert_allclose(rows[key], alone[key], rtol=1e-5, atol=1e-5)  # float32; the heads are sharpened x300
    assert len(np.unique(evalset.table.meta[obs.rows_of(0)], axis=0)) > 1  # obs-a's photos differ in metadata
    for j in range(len(obs)):
        members = obs.rows_of(j)
        meta = torch.from_numpy(evalset.table.meta[obs.first[j]][None])
        expected = observation_log_probs(predictor, [[evalset.table.paths[i] for i in members]], meta)
        for key in predictor.task_keys:
            np.testing.assert_allclose(
                pooled[key][j], expected[key][0].numpy(), rtol=1e-5, atol=1e-5
            )  # float32; the heads are sharpened x300
    metrics = _evaluate(bundle, labelled, tmp_path / "eval")
    agg = metrics["metadata"]["on"]["observations"]["aggregation"]
    assert agg == {"stage": "pooled_before_heads", "pooling_mode": "attention"}
    key = predictor.task_keys[0]
    top1 = metrics["metadata"]["on"]["observations"]["per_rank"][key]["top1"]
    assert top1 == pytest.approx(_expected_top1(pooled, evalset, obs, key))


def test_a_set_without_observation_ids_has_no_observation_figures(tmp_path) -> None:
    ds = write_tiny_dataset(tmp_path / "data", per_species=2)
    with h5py.File(ds.labels_path, "r+") as f:
        f["spatial"].attrs["column_names"] = list(encoders.COLUMN_NAMES["spatial"])
    metrics = _evaluate(_fake_bundle(tmp_path, ds.config(*TINY_MODEL, *NO_ELEVATION)), ds, tmp_path / "eval")
    assert metrics["set"]["observations"] is None
    assert "observations" not in metrics["metadata"]["on"]


def test_a_multi_view_model_is_calibrated_on_its_pooled_answers(labelled, tmp_path) -> None:
    """Pooled answers are what a multi-view model gives; its temperatures are fitted on them (observations whose
    photos agree, novel ones left out), while an image model is calibrated per photo as before."""
    from linnaeus.commands.evaluate import calibrate_bundle
    from linnaeus.inference import calibration

    opts = ("DATA.OBSERVATIONS.ENABLED", "true", "MODEL.VIEW_POOLING", "mean")
    multi = Bundle.load(_fake_bundle(tmp_path / "multi", labelled.config(*TINY_MODEL, *NO_ELEVATION, *opts)))
    evalset = eval_data.from_labels(multi, labelled.labels_path, labelled.images_dir)
    doc = calibrate_bundle(multi, evalset, target_accuracy=0.5, device="cpu")
    obs = eval_observations.observations_of(evalset)
    predictor = Predictor(multi, "cpu", calibrate=False)
    _, pooled = eval_observations.score_observations(predictor, evalset, obs, progress=False)
    keep = obs.agree & ~evalset.novel[obs.first]
    assert doc["unit"] == "observation" and doc["rows"] == int(keep.sum()) < labelled.n_rows
    targets = {k: evalset.table.targets[k][obs.first[keep]] for k in predictor.task_keys}
    expected = calibration.fit({k: v[keep] for k, v in pooled.items()}, targets, evalset.set_id)
    assert doc["temperature_by_rank"] == pytest.approx(expected["temperature_by_rank"])
    image = Bundle.load(_fake_bundle(tmp_path / "image", labelled.config(*TINY_MODEL, *NO_ELEVATION)))
    image_doc = calibrate_bundle(image, eval_data.from_labels(image, labelled.labels_path, labelled.images_dir))
    assert image_doc["unit"] == "image" and image_doc["rows"] == labelled.n_rows
