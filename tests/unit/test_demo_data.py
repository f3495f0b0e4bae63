"""`linnaeus demo-data`: byte-for-byte determinism, labels.h5 schema, taxonomy consistency, metadata-only twins."""

from __future__ import annotations

import json
import time
from datetime import date

import h5py
import numpy as np
import pytest
from PIL import Image

from linnaeus.cli import main
from linnaeus.data import demo, encoders

PER_SPECIES = 6


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    outs = []
    for name in ("a", "b"):
        out = base / name
        assert main(["demo-data", "--out", str(out), "--per-species", str(PER_SPECIES), "--seed", "7"]) == 0
        outs.append(out)
    return outs


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_same_bytes_twice(demo_dirs, capsys):
    a, b = demo_dirs
    files = _files(a)
    assert files == _files(b)
    assert {"labels.h5", "taxonomy.json"} <= set(files) and len(files) == 2 + 12 * PER_SPECIES
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # A rerun into the same folder, in a later second (HDF5 time stamps have 1 s resolution), replaces it
    # cleanly: same bytes, no leftover temporary folders or files.
    time.sleep(1.1)
    assert main(["demo-data", "--out", str(a), "--per-species", str(PER_SPECIES), "--seed", "7"]) == 0
    assert _files(a) == files and (a / "labels.h5").read_bytes() == (b / "labels.h5").read_bytes()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"demo-data: {12 * PER_SPECIES} images (12 species, 4 genera, 2 families")


def test_labels_schema(demo_dirs):
    out = demo_dirs[0]
    n = 12 * PER_SPECIES
    with h5py.File(out / "labels.h5", "r") as f:
        ids = f["img_identifiers"].asstr()[:]
        assert ids.shape == (n,) and h5py.check_string_dtype(f["img_identifiers"].dtype).encoding == "utf-8"
        assert list(ids[:2]) == ["img_000000.jpg", "img_000001.jpg"]
        for key in ("taxa_L10", "taxa_L20", "taxa_L30"):
            assert f[key].dtype == np.uint32 and f[key].shape == (n,)
        expected = {
            "temporal": ((n, 2), encoders.TEMPORAL_COLUMNS),
            "spatial": ((n, 3), encoders.SPATIAL_COLUMNS),
            "elevation_broadrange_2": ((n, 10), encoders.elevation_column_names()),
        }
        for name, (shape, cols) in expected.items():
            ds = f[name]
            assert ds.dtype == np.float32 and ds.shape == shape
            assert [c.decode() if isinstance(c, bytes) else c for c in ds.attrs["column_names"]] == list(cols)
        for name in ("raw_lat", "raw_lon", "raw_elevation"):
            assert f[name].dtype == np.float32 and f[name].shape == (n,)
        assert h5py.check_string_dtype(f["raw_date_observed"].dtype) is not None
        assert f["in_region"].dtype == np.uint8 and f["observer_id"].dtype == np.int32
        config = json.loads(f["metadata"].attrs["config_json"])
        assert config["seed"] == 7 and config["per_species"] == PER_SPECIES

        # Features are exactly the encoders applied to the stored raw values; missing raw -> all-zero rows.
        dates = f["raw_date_observed"].asstr()[:]
        np.testing.assert_array_equal(f["temporal"][:], encoders.encode_temporal(list(dates)))
        np.testing.assert_array_equal(f["spatial"][:], encoders.encode_spatial(f["raw_lat"][:], f["raw_lon"][:]))
        np.testing.assert_array_equal(f["elevation_broadrange_2"][:], encoders.encode_elevation(f["raw_elevation"][:]))
        assert (encoders.valid_mask(f["spatial"][:]) == np.isfinite(f["raw_lat"][:])).all()
    for ident in ids[:3]:
        with Image.open(out / "images" / ident) as im:
            assert im.format == "JPEG" and im.size == (demo.IMAGE_PX, demo.IMAGE_PX) and im.mode == "RGB"


def test_taxonomy_consistent_with_labels(demo_dirs):
    out = demo_dirs[0]
    tax = json.loads((out / "taxonomy.json").read_text())
    ranks = {node["id"]: node["rank"] for node in tax["nodes"]}
    assert sorted(ranks.values()).count("species") == 12 and list(ranks.values()).count("genus") == 4
    assert list(ranks.values()).count("family") == 2
    assert all(isinstance(node["id"], int) and 100000 <= node["id"] <= 999999 and node["name"] for node in tax["nodes"])
    parent = {e["target"]: e["source"] for e in tax["edges"]}
    assert len(parent) == len(tax["edges"]) == 16  # a tree: one parent per child
    with h5py.File(out / "labels.h5", "r") as f:
        sp, ge, fa = f["taxa_L10"][:], f["taxa_L20"][:], f["taxa_L30"][:]
    assert (fa != 0).all() and {ranks[int(x)] for x in np.unique(fa)} == {"family"}
    for s, g, fam in zip(sp, ge, fa, strict=True):
        if g:
            assert ranks[int(g)] == "genus" and parent[int(g)] == fam
        if s:
            assert g and ranks[int(s)] == "species" and parent[int(s)] == g


def test_rows_have_nulls_missing_metadata_sea_level_and_metadata_only_twins():
    rows = demo._build_rows(np.random.default_rng((0, 0)), per_species=200)
    n = 2400
    for key, lo, hi in (("taxa_L10", 0.02, 0.09), ("taxa_L20", 0.005, 0.04)):
        assert lo < (rows[key] == 0).mean() < hi
    assert ((rows["taxa_L20"] == 0) <= (rows["taxa_L10"] == 0)).all()  # genus null -> species null too
    assert 0.01 < np.isnan(rows["raw_lat"]).mean() < 0.06 and 0.01 < (rows["raw_date_observed"] == "").mean() < 0.06
    assert (rows["raw_elevation"] == 0).sum() > 20  # sea level exists and encodes as present
    assert encoders.valid_mask(encoders.encode_elevation([0.0])).all()
    assert len(rows["sp_index"]) == n

    index = {s.id: k for k, s in enumerate(demo.SPECIES)}
    looks = {s.id: s.look for s in demo.SPECIES}
    assert len(set(looks.values())) == 10  # two pairs share a look, all else distinct
    (a, b, why_ab), (c, d, why_cd) = demo.TWIN_PAIRS
    assert looks[a] == looks[b] and looks[c] == looks[d] and (why_ab, why_cd) == ("range", "season")
    lat = rows["raw_lat"]
    in_a, in_b = rows["sp_index"] == index[a], rows["sp_index"] == index[b]
    assert np.nanmax(lat[in_a]) > 15 and np.nanmin(lat[in_a]) > 0 > np.nanmax(lat[in_b])  # disjoint ranges
    month = np.array([date.fromisoformat(x).month if x else 0 for x in rows["raw_date_observed"]])
    months_c = set(month[(rows["sp_index"] == index[c]) & (month > 0)])
    months_d = set(month[(rows["sp_index"] == index[d]) & (month > 0)])
    assert months_c == {3, 4, 5} and months_d == {9, 10, 11}


def test_twins_are_drawn_by_the_same_generator():
    """The two species of each twin pair get the same image generator (their genus' shape and their look): from
    the same random stream they draw the same image, while every other species draws a different one."""
    by_id = {s.id: s for s in demo.SPECIES}
    shape = {g.id: g.shape for g in demo.GENERA}

    def draw(species_id: int) -> np.ndarray:
        sp = by_id[species_id]
        return demo.draw_image(shape[sp.genus], sp.look, np.random.default_rng(1))

    for a, b, _ in demo.TWIN_PAIRS:
        np.testing.assert_array_equal(draw(a), draw(b))
        others = [s.id for s in demo.SPECIES if s.id not in (a, b)]
        assert all(not np.array_equal(draw(a), draw(o)) for o in others), (a, b)


def test_bad_per_species_is_a_one_line_error(tmp_path, capsys):
    assert main(["demo-data", "--out", str(tmp_path / "x"), "--per-species", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: demo-data --per-species: expected an integer >= 1, got 0"


@pytest.mark.parametrize("views", demo.VIEW_KINDS)
def test_observation_variant(tmp_path, capsys, views):
    """2-4 photos per observation sharing labels and metadata; near-duplicate photos nearly equal; detail-in-one
    shows the species' look in exactly one photo of each observation."""
    from linnaeus.data.labels import LabelStore
    from linnaeus.data.stages import describe_observations
    from linnaeus.specs.data import ComponentSpec

    out = tmp_path / views
    argv = ["demo-data", "--out", str(out), "--per-species", "7", "--seed", "3", "--observations", "--views", views]
    assert main(argv) == 0
    assert f"observations ({views} views)" in capsys.readouterr().out
    keys = ["taxa_L10", "taxa_L20", "taxa_L30"]
    spatial = ComponentSpec("SPATIAL", "spatial", (), 3, 0)
    store = LabelStore.load(out / "labels.h5", keys, [spatial])
    sizes = np.unique(store.observation_ids, return_counts=True)[1]
    assert sizes.max() <= 4 and np.mean(sizes >= 2) > 0.8  # a species' last observation may be left with one
    info, lines = describe_observations(store, np.arange(store.n_rows), keys)
    assert lines == [] and info["observations"] == len(sizes)
    pixels = {
        i: np.asarray(Image.open(out / "images" / ident), np.float32) for i, ident in enumerate(store.identifiers)
    }
    codes = store.observation_codes
    first_two = [np.flatnonzero(codes == c)[:2] for c in range(int(codes.max()) + 1) if (codes == c).sum() >= 2]
    gaps = [np.abs(pixels[a] - pixels[b]).mean() for a, b in first_two]
    if views == "near-duplicate":
        assert max(gaps) < 12  # a jitter and noise apart
    else:
        assert min(gaps) > 12  # separate drawings
    if views == "detail-in-one":  # each photo is the neutral look or the species' look, as its role says
        rng = np.random.default_rng((3, 0))
        rows = demo._build_rows(rng, 7)
        demo._group_observations(rows, rng)
        np.testing.assert_array_equal(rows["observation_ids"], store.observation_ids)
        genus_of = {g.id: g for g in demo.GENERA}
        for i in range(0, store.n_rows, 5):
            k, within = int(rows["sp_index"][i]), int(rows["within"][i])
            sp = demo.SPECIES[k]
            drawn = {
                look: demo.draw_image(genus_of[sp.genus].shape, look, np.random.default_rng((3, 1, k, within)))
                for look in (sp.look, "neutral")
            }
            gap = {look: np.abs(pixels[i] - img).mean() for look, img in drawn.items()}
            shown = sp.look if rows["view"][i] == rows["detail_view"][i] else "neutral"
            assert gap[shown] < 6 and gap[shown] < min(gap.values()) + 1e-6, (i, gap)
