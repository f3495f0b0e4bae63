"""Seeded splits, saved splits, pre-split files, and the PreparedData views/artifacts built on them."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
from conftest import write_labels_h5, write_tiny_dataset

from linnaeus.config.resolve_data import data_spec
from linnaeus.data.paths import image_path
from linnaeus.data.prepare import prepare_data
from linnaeus.data.splits import Split, random_split
from linnaeus.errors import DataError


def test_random_split_is_deterministic_disjoint_and_complete():
    rows = np.arange(0, 200, 2)
    tr, va = random_split(rows, 0.9, seed=42)
    assert len(tr) == 90 and len(va) == 10
    assert not set(tr) & set(va) and sorted(set(tr) | set(va)) == rows.tolist()
    assert (np.diff(tr) > 0).all() and (np.diff(va) > 0).all()
    tr2, va2 = random_split(rows[::-1].copy(), 0.9, seed=42)  # input order does not matter
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(va, va2)
    _, va3 = random_split(rows, 0.9, seed=43)
    assert va3.tolist() != va.tolist()
    # Documented algorithm, so other tools can reproduce it.
    perm = np.random.default_rng(42).permutation(100)
    assert va.tolist() == sorted(rows[perm[90:]].tolist())
    assert random_split(rows, 1.0, seed=0)[1].size == 0


def test_prepare_split_repeats_and_saved_split_is_reused(tiny_dataset, tmp_path):
    cfg = tiny_dataset.config()
    a, b = prepare_data(data_spec(cfg)), prepare_data(data_spec(cfg))
    np.testing.assert_array_equal(a.train.rows, b.train.rows)
    np.testing.assert_array_equal(a.val.rows, b.val.rows)
    assert len(a.train) == 18 and len(a.val) == 6
    run = tmp_path / "run"
    a.save(run)
    saved = Split.load(run / "split.npz")
    np.testing.assert_array_equal(saved.val_rows, a.val.rows)
    assert saved.seed == 7 and saved.ratio == 0.75 and saved.fingerprint == a.fingerprint
    # A different seed in the config does not move a resumed run's split: the saved one wins.
    c = prepare_data(data_spec(tiny_dataset.config("DATA.H5.TRAIN_VAL_SPLIT_SEED", "99")), split_file=run / "split.npz")
    np.testing.assert_array_equal(c.val.rows, a.val.rows)
    # Changed labels make the saved split an error, not a silent new split.
    with h5py.File(tiny_dataset.labels_path, "a") as f:
        f["taxa_L10"][0] = 12
    with pytest.raises(DataError, match=r"split file .* labels changed since this run started"):
        prepare_data(data_spec(cfg), split_file=run / "split.npz")


def test_saved_split_rows_must_pass_filters(tiny_dataset, tmp_path):
    data = prepare_data(data_spec(tiny_dataset.config()))
    data.save(tmp_path / "run")
    with pytest.raises(DataError, match=r"removed by the current filters"):
        prepare_data(
            data_spec(tiny_dataset.config("DATA.IN_REGION_ONLY", "true")), split_file=tmp_path / "run" / "split.npz"
        )


def test_arrays_targets_and_counts(tiny_dataset):
    data = prepare_data(data_spec(tiny_dataset.config()))
    a = data.samples("train")
    n = len(a.rows)
    assert a.meta.shape == (n, 15) and a.meta.dtype == np.float32
    assert a.meta_valid.shape == (n, 3) and a.meta_valid.dtype == bool
    assert set(a.targets) == {"taxa_L10", "taxa_L20", "taxa_L30"}
    for key, t in a.targets.items():
        assert t.dtype == np.int64
        ids = tiny_dataset.taxa[key][a.rows]
        assert ((t == -1) == (ids == 0)).all()
        np.testing.assert_array_equal(data.class_maps[key].taxon_ids[t[t >= 0]], ids[ids != 0])
    counts = data.class_counts("train")
    assert counts["taxa_L30"].sum() == n and counts["taxa_L10"].sum() == int((a.targets["taxa_L10"] >= 0).sum())
    total = counts["taxa_L10"] + data.class_counts("val")["taxa_L10"]
    assert total.tolist() == [3] * 7
    assert data.meta_components == ["TEMPORAL", "SPATIAL", "ELEVATION"] and data.meta_dims == [2, 3, 10]


def test_image_paths_extension_and_relative_dirs(tiny_dataset, monkeypatch):
    assert image_path("/d", "a.JPG", ".jpg") == "/d/a.JPG"
    assert image_path("/d", "a", ".jpg") == "/d/a.jpg"
    assert image_path("/d", "obs.12345", ".jpg") == "/d/obs.12345.jpg"  # not an image suffix
    assert image_path("/d", "sub/a.png", ".jpg") == "/d/sub/a.png"
    monkeypatch.chdir(tiny_dataset.root)
    cfg = tiny_dataset.config(
        "DATA.H5.LABELS_PATH", "labels.h5", "DATA.HYBRID.IMAGES_DIR", "images", "DATA.TAXONOMY_PATH", "taxonomy.json"
    )
    data = prepare_data(data_spec(cfg))
    paths = data.image_paths("train")
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in paths)
    assert paths[0] == str(tiny_dataset.root / "images" / "img_0000.jpg")


def test_presplit_files_share_class_maps(tmp_path):
    ds = write_tiny_dataset(tmp_path / "d", images=False)
    with h5py.File(ds.labels_path) as f:
        data = {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset)}
        ids = f["img_identifiers"].asstr()[()]
    val_rows = np.flatnonzero(data["taxa_L10"] == 16)  # Eristalis arbustorum only in the val file
    train_rows = np.setdiff1d(np.arange(len(ids)), val_rows)

    def subset(rows):
        out = {k: v[rows] for k, v in data.items() if k != "img_identifiers"}
        return {"img_identifiers": ids[rows], **out}

    attrs = {"temporal": {"column_names": ["month_sin", "month_cos"]}}
    tr = write_labels_h5(tmp_path / "train.h5", subset(train_rows), attrs=attrs)
    va = write_labels_h5(tmp_path / "val.h5", subset(val_rows), attrs=attrs)
    cfg = ds.config(
        "DATA.H5.LABELS_PATH", "null", "DATA.H5.TRAIN_LABELS_PATH", str(tr), "DATA.H5.VAL_LABELS_PATH", str(va)
    )
    prepared = prepare_data(data_spec(cfg))
    assert len(prepared.train) == len(train_rows) and prepared.val.rows.tolist() == [0, 1, 2]
    assert prepared.split.presplit and prepared.val.store is not prepared.train.store
    assert prepared.num_classes["taxa_L10"] == 7  # the union of both files
    assert prepared.class_counts("train")["taxa_L10"][5] == 0 and prepared.class_counts("val")["taxa_L10"][5] == 3
    assert prepared.stats["classes_without_train_rows"]["taxa_L10"] == 1
    assert prepared.samples("val").targets["taxa_L10"].tolist() == [5, 5, 5]


def test_save_writes_run_artifacts(tiny_dataset, tmp_path):
    data = prepare_data(data_spec(tiny_dataset.config()))
    run = tmp_path / "run"
    data.save(run)
    assert sorted(p.name for p in run.iterdir()) == [
        "class_maps.json",
        "labels_provenance.json",
        "split.npz",
        "stats.json",
        "taxonomy.json",
    ]
    maps = json.loads((run / "class_maps.json").read_text())
    assert maps["taxa_L20"]["num_classes"] == 3 and maps["taxa_L20"]["rank"] == "genus"
    assert maps["taxa_L20"]["classes"][1] == {
        "index": 1,
        "taxon_id": 101,
        "name": "Bombus",
        "rank_level": 20,
        "rank": "genus",
    }
    stats = json.loads((run / "stats.json").read_text())
    assert stats["num_classes"] == {"taxa_L10": 7, "taxa_L20": 3, "taxa_L30": 2}
    assert stats["splits"]["train"]["rows"] + stats["splits"]["val"]["rows"] == 24
    assert stats["labels"][0]["rows_kept"] == 24
    assert set(stats["splits"]["train"]["metadata"]) == {"TEMPORAL", "SPATIAL", "ELEVATION"}
    tax = json.loads((run / "taxonomy.json").read_text())
    assert len(tax["nodes"]) == 12 and {"source": 1001, "target": 17} in tax["edges"]
    prov = json.loads((run / "labels_provenance.json").read_text())
    assert prov[0]["fingerprint"] == data.fingerprint and "conftest" in prov[0]["config_json"]


def test_dataset_builds_file_dataset(tiny_dataset):
    pytest.importorskip("linnaeus.data.dataset")
    data = prepare_data(data_spec(tiny_dataset.config()))
    ds = data.dataset("val", train=False)
    assert len(ds) == len(data.val)
    item = ds[0]
    assert tuple(item["image"].shape) == (3, 64, 64)
    assert int(item["row"]) == int(data.val.rows[0])
    assert item["meta"].shape[0] == 15 and item["meta_valid"].shape[0] == 3
