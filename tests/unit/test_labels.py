"""LabelStore: schema validation (one line per problem), metadata packing/masks, filters, fingerprint, class maps."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import TASK_KEYS, write_labels_h5

from linnaeus.config.resolve_data import data_spec
from linnaeus.data.labels import ComponentSpec, LabelStore, inspect_labels
from linnaeus.data.prepare import prepare_data
from linnaeus.data.stages import filter_rows
from linnaeus.data.taxonomy import ClassMap
from linnaeus.errors import ConfigError, DataError

TEMPORAL = ComponentSpec("TEMPORAL", "temporal", (), 2, 0)


def _store(ds, *opts):
    spec = data_spec(ds.config(*opts))
    store = LabelStore.load(
        ds.labels_path, spec.task_keys, list(spec.meta.components), need_in_region=spec.in_region_key
    )
    return store, spec


def test_load_reads_everything_once(tiny_dataset):
    store, _ = _store(tiny_dataset)
    assert store.n_rows == tiny_dataset.n_rows == 24
    assert list(store.identifiers[:2]) == ["img_0000.jpg", "img_0001"]
    for key in TASK_KEYS:
        assert store.taxa[key].dtype == np.int64
        np.testing.assert_array_equal(store.taxa[key], tiny_dataset.taxa[key])
    assert store.config_json is not None and "conftest" in store.config_json
    assert store.duplicates.count == 0
    assert len(store.fingerprint) == 64


def test_metadata_packed_in_idx_order_with_missing_rows_zeroed(tiny_dataset):
    store, _ = _store(tiny_dataset)
    assert [c.name for c in store.components] == ["TEMPORAL", "SPATIAL", "ELEVATION"]
    assert store.meta.shape == (24, 15) and store.meta.dtype == np.float32
    assert store.meta_slices() == {"TEMPORAL": slice(0, 2), "SPATIAL": slice(2, 5), "ELEVATION": slice(5, 15)}
    with h5py.File(tiny_dataset.labels_path) as f:
        temporal, spatial, elevation = f["temporal"][()], f["spatial"][()], f["elevation_broadrange_2"][()]
    # NaN (row 5) and all-zero (row 2) temporal rows are missing: zeroed, flagged, and not an error.
    assert sorted(np.flatnonzero(~store.meta_valid[:, 0])) == tiny_dataset.temporal_missing
    assert sorted(np.flatnonzero(~store.meta_valid[:, 1])) == tiny_dataset.spatial_missing
    assert store.meta_valid[:, 2].all()  # elevation 0 m (row 0) encodes to cos = 1: valid, not missing
    assert np.isfinite(store.meta).all()
    assert (store.meta[[2, 5], 0:2] == 0).all() and (store.meta[7, 2:5] == 0).all()
    ok = store.meta_valid[:, 0]
    np.testing.assert_array_equal(store.meta[ok, 0:2], temporal[ok])
    np.testing.assert_array_equal(store.meta[:, 5:15], elevation)
    np.testing.assert_array_equal(store.meta[3, 2:5], spatial[3])


def test_idx_decides_packing_order_and_columns_select_by_name(tiny_dataset):
    store, _ = _store(
        tiny_dataset,
        "DATA.META.COMPONENTS",
        "{TEMPORAL: {SOURCE: temporal, COLUMNS: [month_cos, month_sin], DIM: 2, IDX: 1},"
        " SPATIAL: {SOURCE: spatial, DIM: 3, IDX: 0}}",
    )
    assert [c.name for c in store.components] == ["SPATIAL", "TEMPORAL"]
    with h5py.File(tiny_dataset.labels_path) as f:
        temporal, spatial = f["temporal"][()], f["spatial"][()]
    np.testing.assert_array_equal(store.meta[3, 0:3], spatial[3])
    np.testing.assert_array_equal(store.meta[3, 3:5], temporal[3, ::-1])  # config order, not file order


def test_meta_inactive_gives_zero_width(tiny_dataset):
    store, spec = _store(tiny_dataset, "DATA.META.ACTIVE", "false")
    assert spec.meta.components == ()
    assert store.meta.shape == (24, 0) and store.meta_valid.shape == (24, 0)


def test_oor_mask_masks_without_dropping(tiny_dataset):
    store, spec = _store(
        tiny_dataset,
        "DATA.META.COMPONENTS",
        "{SPATIAL: {SOURCE: spatial, DIM: 3, IDX: 0, OOR_MASK: true}, TEMPORAL: {SOURCE: temporal, DIM: 2, IDX: 1}}",
    )
    oor = tiny_dataset.out_of_region
    assert not store.meta_valid[oor, 0].any() and (store.meta[oor, 0:3] == 0).all()
    assert store.meta_valid[oor, 1].all()  # the other component keeps its values
    assert not store.meta_missing[oor, 0].any()  # masked, not missing
    rows, report = filter_rows(spec, store)
    assert len(rows) == 24 and report.steps == []
    stats = store.statistics()["metadata"]["SPATIAL"]
    assert stats["oor_masked"] == 2 and stats["missing"] == 1 and stats["valid"] == 21


def test_filters_are_explicit_and_counted_in_order(tiny_dataset):
    store, spec = _store(
        tiny_dataset,
        "DATA.IN_REGION_ONLY",
        "true",
        "DATA.REQUIRE_ALL_RANKS",
        "true",
        "DATA.META.COMPONENTS.TEMPORAL.ALLOW_MISSING",
        "false",
    )
    rows, report = filter_rows(spec, store)
    got = [(s.name, s.key, s.dropped) for s in report.steps]
    # Rows 20 (species 17) and 21 (genus-only) are out of region; then rank-incomplete rows 18, 19 (species 17 has
    # genus 0), 22 (genus-only), 23 (family-only); then temporal-missing rows 2 and 5.
    assert got == [
        ("in_region_only", "DATA.IN_REGION_ONLY", 2),
        ("require_all_ranks", "DATA.REQUIRE_ALL_RANKS", 4),
        ("missing_temporal", "DATA.META.COMPONENTS.TEMPORAL.ALLOW_MISSING", 2),
    ]
    assert report.rows_total == 24 and report.rows_kept == len(rows) == 16
    assert not set(rows) & {2, 5, 18, 19, 20, 21, 22, 23}


def test_in_region_required_only_when_configured(tmp_path):
    path = write_labels_h5(tmp_path / "l.h5", {"img_identifiers": ["a", "b"], "taxa_L10": np.array([1, 2], np.uint32)})
    assert LabelStore.load(path, ["taxa_L10"]).in_region is None
    with pytest.raises(DataError, match=r"DATA.IN_REGION_ONLY needs dataset 'in_region'"):
        LabelStore.load(path, ["taxa_L10"], need_in_region="DATA.IN_REGION_ONLY")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.uint64])
def test_integer_taxa_dtypes_are_accepted(tmp_path, dtype):
    path = write_labels_h5(tmp_path / "l.h5", {"img_identifiers": ["a", "b"], "taxa_L10": np.array([3, 0], dtype)})
    store = LabelStore.load(path, ["taxa_L10"])
    assert store.taxa["taxa_L10"].tolist() == [3, 0] and store.taxa["taxa_L10"].dtype == np.int64


SCHEMA_CASES = {
    "missing identifiers": (
        {"taxa_L10": np.array([1, 2], np.uint32)},
        [],
        "dataset 'img_identifiers' is missing",
    ),
    "missing taxa": (
        {"img_identifiers": ["a", "b"], "taxa_L20": np.array([1, 2], np.uint32)},
        [],
        "dataset 'taxa_L10' (listed in DATA.TASK_KEYS_H5) is missing; taxa datasets present: ['taxa_L20']",
    ),
    "length mismatch": (
        {"img_identifiers": ["a", "b", "c"], "taxa_L10": np.array([1, 2], np.uint32)},
        [],
        "dataset 'taxa_L10' has 2 rows but 'img_identifiers' has 3",
    ),
    "float taxa": (
        {"img_identifiers": ["a", "b"], "taxa_L10": np.array([1.0, 2.0], np.float32)},
        [],
        "dataset 'taxa_L10' has dtype float32, expected integer taxon ids",
    ),
    "string taxa": (
        {"img_identifiers": ["a", "b"], "taxa_L10": ["1", "2"]},
        [],
        "dataset 'taxa_L10' has dtype object, expected integer taxon ids",
    ),
    "negative taxa": (
        {"img_identifiers": ["a", "b"], "taxa_L10": np.array([1, -4], np.int32)},
        [],
        "dataset 'taxa_L10' row 1 has taxon id -4, expected ids >= 0",
    ),
    "numeric identifiers": (
        {"img_identifiers": np.array([1, 2]), "taxa_L10": np.array([1, 2], np.uint32)},
        [],
        "dataset 'img_identifiers' has dtype int64, expected variable-length strings",
    ),
    "meta dim": (
        {
            "img_identifiers": ["a", "b"],
            "taxa_L10": np.array([1, 2], np.uint32),
            "temporal": np.ones((2, 4), np.float32),
        },
        [TEMPORAL],
        "DATA.META.COMPONENTS.TEMPORAL.DIM is 2 but the dataset has 4 columns (dataset 'temporal'",
    ),
    "meta absent": (
        {"img_identifiers": ["a", "b"], "taxa_L10": np.array([1, 2], np.uint32)},
        [TEMPORAL],
        "DATA.META.COMPONENTS.TEMPORAL.SOURCE: dataset 'temporal' is not in",
    ),
    "meta rows": (
        {
            "img_identifiers": ["a", "b"],
            "taxa_L10": np.array([1, 2], np.uint32),
            "temporal": np.ones((3, 2), np.float32),
        },
        [TEMPORAL],
        "dataset 'temporal' has 3 rows but 'img_identifiers' has 2",
    ),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_schema_violation_is_one_line(tmp_path, case):
    datasets, comps, expected = SCHEMA_CASES[case]
    path = write_labels_h5(tmp_path / "labels.h5", datasets)
    with pytest.raises(DataError) as err:
        LabelStore.load(path, ["taxa_L10"], comps)
    msg = str(err.value)
    assert expected in msg and "\n" not in msg
    assert str(path) in msg  # every schema problem names the file, including those a DATA.META key causes


def test_all_problems_are_listed(tmp_path):
    path = write_labels_h5(
        tmp_path / "labels.h5",
        {
            "img_identifiers": ["a", "b"],
            "taxa_L10": np.array([1.5, 2.5]),
            "taxa_L20": np.array([1, 2, 3], np.uint32),
            "temporal": np.ones((2, 3), np.float32),
        },
    )
    store, problems = inspect_labels(path, ["taxa_L10", "taxa_L20", "taxa_L30"], [TEMPORAL])
    assert store is None
    assert len(problems) == 4
    assert any("taxa_L30" in p and "missing" in p for p in problems)
    with pytest.raises(DataError, match=r"\(\+3 more problems"):
        LabelStore.load(path, ["taxa_L10", "taxa_L20", "taxa_L30"], [TEMPORAL])


def test_column_selection_errors(tmp_path):
    base = {"img_identifiers": ["a", "b"], "taxa_L10": np.array([1, 2], np.uint32), "temporal": np.ones((2, 2))}
    path = write_labels_h5(tmp_path / "a.h5", base)
    spec = ComponentSpec("TEMPORAL", "temporal", ("month_sin", "month_cos"), 2, 0)
    with pytest.raises(DataError, match="needs a 'column_names' attribute"):
        LabelStore.load(path, ["taxa_L10"], [spec])
    path = write_labels_h5(tmp_path / "b.h5", base, attrs={"temporal": {"column_names": ["month_sin", "hour_sin"]}})
    with pytest.raises(DataError, match=r"COLUMNS \['month_cos'\] not in the dataset's column_names"):
        LabelStore.load(path, ["taxa_L10"], [spec])


def test_not_hdf5_and_absent_file(tmp_path):
    bogus = tmp_path / "labels.h5"
    bogus.write_text("img_identifiers,taxa_L10\na.jpg,1\n")
    with pytest.raises(DataError, match=r"is not an HDF5 file"):
        LabelStore.load(bogus, ["taxa_L10"])
    with pytest.raises(DataError, match=r"does not exist"):
        LabelStore.load(tmp_path / "nope.h5", ["taxa_L10"])


def test_identifiers_not_utf8(tmp_path):
    path = write_labels_h5(tmp_path / "l.h5", {"taxa_L10": np.array([1, 2], np.uint32)})
    with h5py.File(path, "a") as f:
        f.create_dataset(
            "img_identifiers",
            data=np.array([b"a.jpg", b"\xff\xfe.jpg"], dtype=object),
            dtype=h5py.string_dtype("utf-8"),
        )
    with pytest.raises(DataError, match="dataset 'img_identifiers' holds bytes that are not UTF-8"):
        LabelStore.load(path, ["taxa_L10"])


def test_duplicates_reported_not_fatal(tmp_path):
    path = write_labels_h5(
        tmp_path / "l.h5", {"img_identifiers": ["a", "b", "a", "a"], "taxa_L10": np.array([1, 2, 1, 1], np.uint32)}
    )
    store = LabelStore.load(path, ["taxa_L10"])
    assert store.duplicates.count == 2
    assert store.duplicates.examples == [("a", [0, 2, 3])]
    assert "2 rows repeat" in store.duplicates.line(path)


def test_fingerprint_stable_and_label_sensitive(tmp_path):
    data = {"img_identifiers": ["a", "b"], "taxa_L10": np.array([1, 2], np.uint32)}
    p1 = write_labels_h5(tmp_path / "1.h5", data)
    fp = LabelStore.load(p1, ["taxa_L10"]).fingerprint
    assert LabelStore.load(p1, ["taxa_L10"]).fingerprint == fp
    with h5py.File(p1, "a") as f:
        f["taxa_L10"][1] = 3
    assert LabelStore.load(p1, ["taxa_L10"]).fingerprint != fp


def test_raw_fields_encoded_when_derived_dataset_absent(tmp_path, tiny_dataset):
    with h5py.File(tiny_dataset.labels_path) as f:
        data = {k: f[k][()] for k in ("taxa_L10", "raw_lat", "raw_lon", "spatial")}
        ids = f["img_identifiers"].asstr()[()]
    path = write_labels_h5(
        tmp_path / "raw.h5",
        {"img_identifiers": ids, "taxa_L10": data["taxa_L10"], "raw_lat": data["raw_lat"], "raw_lon": data["raw_lon"]},
    )
    spec = ComponentSpec("SPATIAL", "spatial", (), 3, 0)
    store = LabelStore.load(path, ["taxa_L10"], [spec])
    assert store.meta_origin == {"SPATIAL": "raw"}
    np.testing.assert_allclose(store.meta[3], data["spatial"][3], atol=1e-5)


def test_class_map_vectorised_index():
    cmap = ClassMap.from_ids("taxa_L10", [np.array([30, 10, 0, 20, 10])])
    assert cmap.taxon_ids.tolist() == [10, 20, 30] and len(cmap) == 3
    assert cmap.index(np.array([0, 10, 30, 20, 99, 5])).tolist() == [-1, 0, 2, 1, -1, -1]
    assert cmap.to_json()[1] == {"index": 1, "taxon_id": 20, "name": None, "rank_level": 10, "rank": "species"}


def test_num_classes_checked_or_inferred(tiny_dataset):
    data = prepare_data(data_spec(tiny_dataset.config()))
    assert data.num_classes == {"taxa_L10": 7, "taxa_L20": 3, "taxa_L30": 2}
    cfg = tiny_dataset.config(
        "MODEL.CLASSIFICATION.HEADS", "{taxa_L10: {NUM_CLASSES: 150}, taxa_L20: {}, taxa_L30: {}}"
    )
    with pytest.raises(ConfigError) as err:
        prepare_data(data_spec(cfg))
    msg = str(err.value)
    assert "MODEL.CLASSIFICATION.HEADS.taxa_L10.NUM_CLASSES is 150" in msg and "has 7 distinct non-null taxa_L10" in msg
    cfg = tiny_dataset.config("DATA.NUM_CLASSES_PER_LEVEL", "{taxa_L20: 4}")
    with pytest.raises(ConfigError, match=r"DATA.NUM_CLASSES_PER_LEVEL.taxa_L20 is 4 but .* has 3 distinct"):
        prepare_data(data_spec(cfg))


def test_encoded_range_is_checked_only_where_an_encoder_defines_it(tmp_path):
    path = write_labels_h5(
        tmp_path / "labels.h5",
        {
            "img_identifiers": ["a", "b", "c"],
            "taxa_L10": np.array([1, 2, 3], np.uint32),
            "temporal": np.array([[0.5, 0.8], [1.0001, -1.0], [np.nan, 7.0]], np.float32),  # float noise and a NaN
            "custom": np.array([[1e30], [2.0], [-5.0]], np.float32),  # no encoder here: its range is the user's
        },
    )
    custom = ComponentSpec("CUSTOM", "custom", (), 1, 1)
    store, problems = inspect_labels(path, ["taxa_L10"], [TEMPORAL, custom])
    assert problems == [] and store.meta_missing[2, 0] and store.meta[0, 2] == np.float32(1e30)
    with h5py.File(path, "a") as f:
        f["temporal"][1] = [1.5, 0.0]
    with pytest.raises(DataError) as err:
        LabelStore.load(path, ["taxa_L10"], [TEMPORAL, custom])
    assert str(err.value) == (
        f"{path}: dataset 'temporal' row 1 holds 1.5, outside [-1, 1], the range of its encoding (1 rows like this;"
        " DATA.META.COMPONENTS.TEMPORAL); fix the file, or write NaN to mark a row missing"
    )
