"""A small synthetic taxonomic dataset in the real labels.h5 schema (``linnaeus demo-data`` writes it).

2 families ⊃ 4 genera ⊃ 12 species. Genus sets the SHAPE (circle, square, triangle, cross); species sets colour
and texture; every image adds a random background, distractor blobs, noise and random position/scale/rotation.
Two pairs of species are drawn by the same generator and differ only in metadata, so a model needs metadata to
tell them apart (and validation with metadata masked shows it):

- Orbis borealis / Orbis australis: same look, different ranges (North America vs Australia);
- Trigona vernalis / Trigona autumnalis: same look, same range, different seasons (Mar-May vs Sep-Nov).

labels.h5 holds ``img_identifiers``, ``taxa_L10/L20/L30`` (uint32; a few % null at species and genus, never at
family), ``raw_lat``, ``raw_lon``, ``raw_date_observed``, ``raw_elevation`` and the features ``temporal`` (N, 2),
``spatial`` (N, 3), ``elevation_broadrange_2`` (N, 10) computed from them by ``linnaeus.data.encoders`` (a few %
missing: raw NaN/"" and all-zero features), plus ``in_region``, ``observer_id``, ``anomaly_score`` and a
``metadata`` group with ``config_json``. ``taxonomy.json`` uses the nodes/edges form of the prior system's user guide.

Observations (``--observations``): each species' images are grouped into observations of 2-4 photos that share
labels and metadata, written to ``observation_ids``. ``views`` says how the photos of one observation differ:

- ``distinct``: independent drawings (pose, background, noise), like photos of one organism from several angles;
- ``near-duplicate``: one drawing with a little fresh noise per photo (burst shots: the leak a row split rewards);
- ``detail-in-one``: the species' colour and texture show in one randomly chosen photo; the others show the genus
  shape in a neutral grey, so only a model that looks at every photo can name the species.

The output is byte-for-byte deterministic for a given (seed, per_species): fixed JPEG settings, fixed row order,
no timestamps in HDF5 objects. Files are written to temporary names and renamed; labels.h5 comes last.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

from linnaeus.data import encoders
from linnaeus.errors import ConfigError
from linnaeus.utils.io import atomic_write_json

IMAGE_PX = 72  # small enough to write quickly, large enough for DATA.IMG_SIZE 64 crops
JPEG_QUALITY = 90
SPECIES_NULL_RATE = 0.03  # species unknown, genus known
GENUS_NULL_RATE = 0.02  # only the family is known (species and genus null)
META_MISSING_RATE = 0.03  # per component, independently
OUT_OF_REGION_RATE = 0.02
IMAGES_SUBDIR = "images"


@dataclass(frozen=True)
class Family:
    id: int
    name: str


@dataclass(frozen=True)
class Genus:
    id: int
    name: str
    family: int
    shape: str


@dataclass(frozen=True)
class Species:
    id: int
    name: str
    genus: int
    look: str  # key into LOOKS; twins share one
    region: str  # key into REGIONS
    months: tuple[int, ...]
    elevation: tuple[float, float]  # mean, sd in metres; values below 0 are clipped to sea level


FAMILIES = (Family(204512, "Pollinidae"), Family(208731, "Linnaeidae"))
GENERA = (
    Genus(311024, "Orbis", 204512, "circle"),
    Genus(311187, "Quadrata", 204512, "square"),
    Genus(315402, "Trigona", 208731, "triangle"),
    Genus(315866, "Cruciata", 208731, "cross"),
)
ALL_YEAR = tuple(range(1, 13))
SUMMER = (5, 6, 7, 8)
SPECIES = (
    Species(420117, "Orbis borealis", 311024, "red_solid", "north_america", ALL_YEAR, (300, 300)),
    Species(420134, "Orbis australis", 311024, "red_solid", "australia", ALL_YEAR, (200, 250)),
    Species(420158, "Orbis caerulea", 311024, "blue_stripes", "europe", SUMMER, (600, 400)),
    Species(421003, "Quadrata lutea", 311187, "yellow_solid", "south_america", ALL_YEAR, (800, 500)),
    Species(421019, "Quadrata viridis", 311187, "green_dots", "africa", ALL_YEAR, (1200, 500)),
    Species(421045, "Quadrata purpurea", 311187, "purple_stripes", "asia", ALL_YEAR, (900, 600)),
    Species(425210, "Trigona vernalis", 315402, "orange_checker", "europe", (3, 4, 5), (400, 300)),
    Species(425236, "Trigona autumnalis", 315402, "orange_checker", "europe", (9, 10, 11), (400, 300)),
    Species(425251, "Trigona cyanea", 315402, "cyan_solid", "north_america", SUMMER, (1500, 600)),
    Species(426704, "Cruciata montana", 315866, "white_dots", "asia", ALL_YEAR, (2500, 500)),
    Species(426733, "Cruciata maritima", 315866, "pink_solid", "australia", ALL_YEAR, (10, 40)),
    Species(426790, "Cruciata fusca", 315866, "brown_stripes", "south_america", ALL_YEAR, (700, 400)),
)
# Species pairs that look identical and differ only by metadata: (a, b, what differs).
TWIN_PAIRS = ((420117, 420134, "range"), (425210, 425236, "season"))

# lat, lon centre and spread (degrees)
REGIONS: dict[str, tuple[float, float, float, float]] = {
    "north_america": (45.0, -100.0, 6.0, 12.0),
    "south_america": (-15.0, -60.0, 8.0, 10.0),
    "europe": (48.0, 10.0, 5.0, 10.0),
    "africa": (0.0, 25.0, 8.0, 10.0),
    "asia": (35.0, 105.0, 7.0, 12.0),
    "australia": (-27.0, 135.0, 6.0, 10.0),
}
# colour (RGB) and texture
LOOKS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red_solid": ((205, 40, 40), "solid"),
    "blue_stripes": ((40, 80, 215), "stripes"),
    "yellow_solid": ((230, 205, 40), "solid"),
    "green_dots": ((40, 170, 60), "dots"),
    "purple_stripes": ((140, 50, 175), "stripes"),
    "orange_checker": ((240, 130, 20), "checker"),
    "cyan_solid": ((40, 200, 215), "solid"),
    "white_dots": ((238, 238, 238), "dots"),
    "pink_solid": ((240, 130, 185), "solid"),
    "brown_stripes": ((130, 80, 40), "stripes"),
    "neutral": ((150, 150, 150), "solid"),  # detail-in-one views: the genus shape without the species' look
}
VIEW_KINDS = ("distinct", "near-duplicate", "detail-in-one")
VIEWS_PER_OBSERVATION = (2, 4)  # inclusive


# ------------------------------------------------------------------------------------------------------- drawing
_YY, _XX = np.mgrid[0:IMAGE_PX, 0:IMAGE_PX].astype(np.float32)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in shape coordinates (u, v scaled so the shape's circumradius is about 1)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if shape == "triangle":  # equilateral, circumradius 1, inradius 0.5
        inside = np.ones_like(u, dtype=bool)
        for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6):
            inside &= u * np.cos(a) + v * np.sin(a) <= 0.5
        return inside
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(kind: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """1 = base colour, 0 = the darker tone, in shape coordinates so the texture turns with the shape."""
    if kind == "solid":
        return np.ones_like(u)
    if kind == "stripes":
        return (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
    if kind == "dots":
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        return (du * du + dv * dv > (period / 3.2) ** 2).astype(np.float32)
    if kind == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def near_duplicate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another shot of the same scene: a slight exposure change and fresh sensor noise."""
    shot = img.astype(np.float32) * rng.uniform(0.95, 1.05) + rng.normal(0, 4, size=img.shape)
    return np.clip(np.rint(shot), 0, 255).astype(np.uint8)


def draw_image(shape: str, look: str, rng: np.random.Generator) -> np.ndarray:
    """One (IMAGE_PX, IMAGE_PX, 3) uint8 image of ``shape`` in ``look`` with random pose, background and noise."""
    size = IMAGE_PX
    # Background: a random muted colour with a gradient, so it says nothing about the taxon.
    base = rng.uniform(50, 170, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(angle) * _XX + np.sin(angle) * _YY) / size - 0.5
    img = base[None, None, :] + rng.uniform(20, 50) * grad[:, :, None]
    for _ in range(int(rng.integers(0, 3))):  # small distractor blobs
        cx, cy, rad = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 6)
        blob = (_XX - cx) ** 2 + (_YY - cy) ** 2 <= rad * rad
        img[blob] = rng.uniform(30, 220, size=3)

    radius = rng.uniform(14, 22)
    margin = 1.1 * radius
    cx, cy = rng.uniform(margin, size - margin, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    dx, dy = (_XX - cx) / radius, (_YY - cy) / radius
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    mask = _shape_mask(shape, u, v)

    colour, texture = LOOKS[look]
    tone = np.clip(np.asarray(colour, np.float32) + rng.normal(0, 10, size=3), 0, 255) * rng.uniform(0.85, 1.15)
    t = _texture(texture, u * radius, v * radius, period=rng.uniform(7, 9))
    fill = tone[None, None, :] * (0.45 + 0.55 * t[:, :, None])
    img = np.where(mask[:, :, None], fill, img)
    img = img + rng.normal(0, 8, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ records
def _build_rows(rng: np.random.Generator, per_species: int) -> dict[str, np.ndarray]:
    """Labels and raw metadata for every image, shuffled into a fixed row order."""
    genus_of = {g.id: g for g in GENERA}
    n = per_species * len(SPECIES)
    sp_index = np.repeat(np.arange(len(SPECIES)), per_species)
    within = np.tile(np.arange(per_species), len(SPECIES))
    order = rng.permutation(n)
    sp_index, within = sp_index[order], within[order]

    species_ids = np.array([SPECIES[i].id for i in sp_index], dtype=np.uint32)
    genus_ids = np.array([SPECIES[i].genus for i in sp_index], dtype=np.uint32)
    family_ids = np.array([genus_of[SPECIES[i].genus].family for i in sp_index], dtype=np.uint32)

    lat = np.empty(n, np.float64)
    lon = np.empty(n, np.float64)
    elev = np.empty(n, np.float64)
    months = np.empty(n, np.int64)
    for k, sp in enumerate(SPECIES):
        rows = np.flatnonzero(sp_index == k)
        clat, clon, slat, slon = REGIONS[sp.region]
        lat[rows] = np.clip(rng.normal(clat, slat, rows.size), -89.0, 89.0)
        lon[rows] = (rng.normal(clon, slon, rows.size) + 180.0) % 360.0 - 180.0
        elev[rows] = np.maximum(0.0, rng.normal(sp.elevation[0], sp.elevation[1], rows.size))
        months[rows] = rng.choice(np.asarray(sp.months), size=rows.size)
    years = rng.integers(2015, 2025, size=n)
    days = rng.integers(1, 29, size=n)

    # Nulls: species unknown (genus known), or only the family known.
    u = rng.random(n)
    species_ids[u < SPECIES_NULL_RATE + GENUS_NULL_RATE] = 0
    genus_ids[u < GENUS_NULL_RATE] = 0

    missing_space, missing_time, missing_elev = (rng.random(n) < META_MISSING_RATE for _ in range(3))
    raw_lat = np.where(missing_space, np.nan, lat).astype(np.float32)
    raw_lon = np.where(missing_space, np.nan, lon).astype(np.float32)
    raw_elev = np.where(missing_elev, np.nan, np.round(elev, 1)).astype(np.float32)
    dates = np.array(
        ["" if missing_time[i] else f"{years[i]:04d}-{months[i]:02d}-{days[i]:02d}" for i in range(n)], dtype=object
    )
    out = {
        "sp_index": sp_index,
        "within": within,
        "taxa_L10": species_ids,
        "taxa_L20": genus_ids,
        "taxa_L30": family_ids,
        "raw_lat": raw_lat,
        "raw_lon": raw_lon,
        "raw_elevation": raw_elev,
        "raw_date_observed": dates,
        "in_region": (rng.random(n) >= OUT_OF_REGION_RATE).astype(np.uint8),
        "observer_id": rng.integers(1, 151, size=n).astype(np.int32),
    }
    return out


def _group_observations(rows: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    """Group each species' images (by their number within the species) into observations of 2-4 photos; every
    photo of an observation takes its first photo's labels and metadata. Adds ``observation_ids``, ``view`` (the
    photo's position in its observation), ``first_within`` and ``detail_view`` (the one photo that shows the
    species in the detail-in-one variant)."""
    n = len(rows["sp_index"])
    obs = np.zeros(n, np.int64)
    view = np.zeros(n, np.int64)
    first_within = np.zeros(n, np.int64)
    detail = np.zeros(n, np.int64)
    lo, hi = VIEWS_PER_OBSERVATION
    next_id = 1
    for k in range(len(SPECIES)):
        members = np.flatnonzero(rows["sp_index"] == k)
        members = members[np.argsort(rows["within"][members], kind="stable")]
        start = 0
        while start < len(members):
            size = int(rng.integers(lo, hi + 1))
            group = members[start : start + size]
            obs[group] = 10_000 + 37 * next_id  # ids need not be dense or ordered
            view[group] = np.arange(len(group))
            first_within[group] = rows["within"][group[0]]
            detail[group] = int(rng.integers(0, len(group)))
            for key in (
                "taxa_L10",
                "taxa_L20",
                "taxa_L30",
                "raw_lat",
                "raw_lon",
                "raw_elevation",
                "raw_date_observed",
                "in_region",
                "observer_id",
            ):
                rows[key][group] = rows[key][group[0]]
            next_id += 1
            start += size
    rows.update(observation_ids=obs, view=view, first_within=first_within, detail_view=detail)


# ------------------------------------------------------------------------------------------------------ writing
def _create(group: h5py.Group, name: str, data: np.ndarray, **attrs: Any) -> None:
    # track_times=False: HDF5 otherwise stamps every object with its creation time and the bytes would differ.
    ds = group.create_dataset(name, data=data, track_times=False)
    for key, value in attrs.items():
        ds.attrs[key] = value


def _strings(values: Any) -> np.ndarray:
    return np.array(list(values), dtype=h5py.string_dtype("utf-8"))


def _write_labels(path: Path, rows: dict[str, np.ndarray], identifiers: list[str], config: dict[str, Any]) -> None:
    raw = {k: rows[k] for k in ("raw_lat", "raw_lon", "raw_date_observed", "raw_elevation")}
    scales = encoders.ELEVATION_SETS["elevation_broadrange_2"]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w", libver="earliest", track_order=False) as f:
            _create(f, "img_identifiers", _strings(identifiers))
            for key in ("taxa_L10", "taxa_L20", "taxa_L30"):
                _create(f, key, rows[key])
            _create(
                f,
                "temporal",
                encoders.encode_from_raw("temporal", raw),
                column_names=_strings(encoders.TEMPORAL_COLUMNS),
                method="sinusoidal",
            )
            _create(
                f,
                "spatial",
                encoders.encode_from_raw("spatial", raw),
                column_names=_strings(encoders.SPATIAL_COLUMNS),
                method="unit_sphere",
            )
            _create(
                f,
                "elevation_broadrange_2",
                encoders.encode_from_raw("elevation_broadrange_2", raw),
                column_names=_strings(encoders.elevation_column_names(scales)),
                method="sinusoidal",
                scales=np.asarray(scales, dtype=np.float32),
            )
            _create(f, "raw_lat", rows["raw_lat"])
            _create(f, "raw_lon", rows["raw_lon"])
            _create(f, "raw_elevation", rows["raw_elevation"])
            _create(f, "raw_date_observed", _strings(rows["raw_date_observed"]))
            _create(f, "in_region", rows["in_region"])
            _create(f, "observer_id", rows["observer_id"])
            _create(f, "anomaly_score", np.zeros(len(identifiers), dtype=np.float32))
            if "observation_ids" in rows:
                _create(f, "observation_ids", rows["observation_ids"])
            # h5py's create_group has no track_times switch; go through the low-level API with a creation plist.
            gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
            gcpl.set_obj_track_times(False)
            meta = h5py.Group(h5py.h5g.create(f.id, b"metadata", gcpl=gcpl))
            meta.attrs["config_json"] = json.dumps(config, sort_keys=True)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; this file is meant to be shared like the images
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def taxonomy_json() -> dict[str, Any]:
    """The demo taxonomy in the user guide's nodes/edges form: nodes (id, rank, name) and parent → child edges."""
    nodes = [{"id": f.id, "rank": "family", "name": f.name} for f in FAMILIES]
    nodes += [{"id": g.id, "rank": "genus", "name": g.name} for g in GENERA]
    nodes += [{"id": s.id, "rank": "species", "name": s.name} for s in SPECIES]
    edges = [{"source": g.family, "target": g.id} for g in GENERA]
    edges += [{"source": s.genus, "target": s.id} for s in SPECIES]
    return {"nodes": nodes, "edges": edges}


def _draw(rows: dict[str, np.ndarray], i: int, seed: int, views: str) -> np.ndarray:
    """Row ``i``'s image (see the module docstring for ``views``)."""
    genus_of = {g.id: g for g in GENERA}
    k = int(rows["sp_index"][i])
    sp = SPECIES[k]
    shape = genus_of[sp.genus].shape
    if views == "near-duplicate":
        base = draw_image(shape, sp.look, np.random.default_rng((seed, 1, k, int(rows["first_within"][i]))))
        if rows["view"][i] == 0:
            return base
        return near_duplicate(base, np.random.default_rng((seed, 2, k, int(rows["within"][i]))))
    look = sp.look
    if views == "detail-in-one" and rows["view"][i] != rows["detail_view"][i]:
        look = "neutral"
    # Each image from its own stream: (seed, species, number within species), independent of row order.
    return draw_image(shape, look, np.random.default_rng((seed, 1, k, int(rows["within"][i]))))


def _write_images(
    out: Path, rows: dict[str, np.ndarray], identifiers: list[str], seed: int, views: str = "distinct"
) -> Path:
    """Draw every image into a fresh folder, then swap it in for ``out/images`` in one rename."""
    final = out / IMAGES_SUBDIR
    partial = Path(tempfile.mkdtemp(prefix=f".{IMAGES_SUBDIR}.", suffix=".partial", dir=out))
    try:
        for i, ident in enumerate(identifiers):
            (partial / ident).write_bytes(_jpeg_bytes(_draw(rows, i, seed, views)))
        os.chmod(partial, 0o755)
        old = None
        if final.exists():
            old = out / f".{IMAGES_SUBDIR}.old.{os.getpid()}"
            os.replace(final, old)
        os.replace(partial, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def write_demo_dataset(
    out: Path, seed: int = 0, per_species: int = 200, observations: bool = False, views: str = "distinct"
) -> dict[str, Any]:
    """Write ``out/images/*.jpg``, ``out/taxonomy.json`` and ``out/labels.h5``; return a summary dict.

    ``observations``: group the images into observations of 2-4 photos (``observation_ids``); ``views``: how the
    photos of one observation differ (distinct | near-duplicate | detail-in-one)."""
    if views not in VIEW_KINDS:
        raise ConfigError(f"demo-data --views: expected one of {', '.join(VIEW_KINDS)}, got {views!r}")
    if views != "distinct" and not observations:
        raise ConfigError(f"demo-data --views {views}: needs --observations (views are photos of one observation)")
    if per_species < 1:
        raise ConfigError(f"demo-data --per-species: expected an integer >= 1, got {per_species}")
    if seed < 0:
        raise ConfigError(f"demo-data --seed: expected an integer >= 0, got {seed}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((seed, 0))
    rows = _build_rows(rng, per_species)
    if observations:
        _group_observations(rows, rng)  # after every other draw, so the image-only dataset stays as it was
    n = len(rows["sp_index"])
    identifiers = [f"img_{i:06d}.jpg" for i in range(n)]
    images_dir = _write_images(out, rows, identifiers, seed, views)
    atomic_write_json(out / "taxonomy.json", taxonomy_json())
    config = {
        "generator": "linnaeus demo-data",
        "seed": seed,
        "per_species": per_species,
        "image_px": IMAGE_PX,
        "jpeg_quality": JPEG_QUALITY,
        "ranks": {"taxa_L10": "species", "taxa_L20": "genus", "taxa_L30": "family"},
        "twin_pairs": [{"a": a, "b": b, "differ_by": why} for a, b, why in TWIN_PAIRS],
        "elevation_scales": list(encoders.ELEVATION_SCALES),
        "temporal": "month sin/cos (month/12)",
    }
    if observations:
        config["observations"] = {"views_per_observation": list(VIEWS_PER_OBSERVATION), "views": views}
    _write_labels(out / "labels.h5", rows, identifiers, config)
    return {
        "out": str(out),
        "images_dir": str(images_dir),
        "labels": str(out / "labels.h5"),
        "taxonomy": str(out / "taxonomy.json"),
        "num_images": n,
        "num_species": len(SPECIES),
        "num_genera": len(GENERA),
        "num_families": len(FAMILIES),
        "species_nulls": int((rows["taxa_L10"] == 0).sum()),
        "genus_nulls": int((rows["taxa_L20"] == 0).sum()),
        "num_observations": len(np.unique(rows["observation_ids"])) if observations else None,
        "views": views if observations else None,
    }
