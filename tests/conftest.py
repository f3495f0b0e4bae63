"""Shared test fixtures: a tiny but complete dataset (labels.h5 + JPEGs + taxonomy.json + experiment YAML).

The ``demo`` fixture is the synthetic demo dataset (30 images per species), written once per test session and
shared by every module that trains on it. ``four_step_run(launcher)`` is a 4-step 2-process run of it per launcher
(``cpu_ddp``, ``cpu_zero2``, ``cpu_zero3``), also launched once per session: read it, or copy it to change it.

Use the ``tiny_dataset`` fixture (written under ``tmp_path``) or call :func:`write_tiny_dataset` for variants::

    def test_something(tiny_dataset):
        cfg = tiny_dataset.config("DATA.BATCH_SIZE", "2")   # load_config(exp.yaml, opts)
        data = prepare_data(data_spec(cfg))

The taxonomy (ids are what ``taxa_LXX`` hold; 0 = null)::

    family 1000 Apidae     ─ genus 100 Apis      ─ species 11 Apis mellifera, 12 Apis cerana
                           ─ genus 101 Bombus    ─ species 13 Bombus terrestris, 14 Bombus pascuorum
    family 1001 Syrphidae  ─ genus 102 Eristalis ─ species 15 Eristalis tenax, 16 Eristalis arbustorum
                           ─ species 17 Syrphidae sp. (directly under the family: a skip-level link)

Rows: ``per_species`` rows per species (species 17's rows have genus 0), then 2 genus-only rows (Bombus) and 1
family-only row (Syrphidae). Identifiers alternate ``img_0000.jpg`` / ``img_0001`` (no extension; the file is
``img_0001.jpg``) so FILE_EXTENSION handling is always exercised. Metadata (see ``TinyDataset``): ``temporal``
(N,2, with column_names), ``spatial`` (N,3), ``elevation_broadrange_2`` (N,10), ``in_region`` (N,) and a
``metadata`` group with ``config_json``; a few rows are deliberately missing (zeros or NaN).

Building blocks for other shapes of data: ``write_labels_h5(path, {name: array}, attrs=..., config_json=...)``
(str lists become variable-length UTF-8 strings), ``write_jpeg(path, size, color)`` and ``taxonomy_doc()``.
Import them with ``from conftest import write_labels_h5`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from PIL import Image

from launch_utils import ensure_demo, launch, run_dir, tiny_opts

TAXA_NODES: list[dict[str, Any]] = [
    {"id": 1000, "rank": "family", "name": "Apidae"},
    {"id": 1001, "rank": "family", "name": "Syrphidae"},
    {"id": 100, "rank": "genus", "name": "Apis"},
    {"id": 101, "rank": "genus", "name": "Bombus"},
    {"id": 102, "rank": "genus", "name": "Eristalis"},
    {"id": 11, "rank": "species", "name": "Apis mellifera"},
    {"id": 12, "rank": "species", "name": "Apis cerana"},
    {"id": 13, "rank": "species", "name": "Bombus terrestris"},
    {"id": 14, "rank": "species", "name": "Bombus pascuorum"},
    {"id": 15, "rank": "species", "name": "Eristalis tenax"},
    {"id": 16, "rank": "species", "name": "Eristalis arbustorum"},
    {"id": 17, "rank": "species", "name": "Syrphidae sp."},
]
TAXA_EDGES: list[tuple[int, int]] = [
    (1000, 100),
    (1000, 101),
    (1001, 102),
    (100, 11),
    (100, 12),
    (101, 13),
    (101, 14),
    (102, 15),
    (102, 16),
    (1001, 17),  # skip-level: no genus
]
# species -> (genus, family) as labels.h5 writes them (genus 0 where the taxonomy has none)
SPECIES_CHAIN: dict[int, tuple[int, int]] = {
    11: (100, 1000),
    12: (100, 1000),
    13: (101, 1000),
    14: (101, 1000),
    15: (102, 1001),
    16: (102, 1001),
    17: (0, 1001),
}
TASK_KEYS = ["taxa_L10", "taxa_L20", "taxa_L30"]
TEMPORAL_COLUMNS = ["month_sin", "month_cos"]
ELEVATION_SCALES = (100.0, 500.0, 1000.0, 5000.0, 20000.0)


def taxonomy_doc() -> dict[str, Any]:
    return {"nodes": [dict(n) for n in TAXA_NODES], "edges": [{"source": s, "target": t} for s, t in TAXA_EDGES]}


def write_jpeg(path: Path, size: int = 40, color: tuple[int, int, int] = (120, 80, 40)) -> Path:
    """A real, small RGB JPEG with a little structure (a diagonal gradient) so decoders do real work."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 60, size, dtype=np.float32)
    img = np.clip(np.array(color, np.float32)[None, None, :] + (ramp[:, None] + ramp[None, :])[..., None], 0, 255)
    Image.fromarray(img.astype(np.uint8), "RGB").save(path, format="JPEG", quality=85)
    return path


def write_labels_h5(
    path: Path,
    datasets: Mapping[str, Any],
    *,
    attrs: Mapping[str, Mapping[str, Any]] | None = None,
    config_json: str | None = None,
) -> Path:
    """Write an arbitrary labels.h5: ``datasets`` name -> array (str lists become variable-length UTF-8 strings).

    ``attrs`` name -> {attribute: value} per dataset (e.g. ``{"temporal": {"column_names": [...]}}``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            arr = np.asarray(value)
            if arr.dtype.kind in "UO":
                f.create_dataset(name, data=arr.astype(object), dtype=h5py.string_dtype())
            else:
                f.create_dataset(name, data=arr)
            for key, attr in (attrs or {}).get(name, {}).items():
                f[name].attrs[key] = attr
        if config_json is not None:
            f.create_group("metadata").attrs["config_json"] = config_json
    return path


def _temporal(months: np.ndarray) -> np.ndarray:
    angle = 2 * np.pi * months / 12.0
    return np.stack([np.sin(angle), np.cos(angle)], 1).astype(np.float32)


def _spatial(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    phi, lam = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], 1).astype(np.float32)


def _elevation(elev: np.ndarray) -> np.ndarray:
    cols = []
    for s in ELEVATION_SCALES:
        cols += [np.sin(2 * np.pi * elev / s), np.cos(2 * np.pi * elev / s)]
    return np.stack(cols, 1).astype(np.float32)


@dataclass
class TinyDataset:
    """Paths and ground truth of a dataset written by :func:`write_tiny_dataset`."""

    root: Path
    labels_path: Path
    images_dir: Path
    taxonomy_path: Path
    config_path: Path
    identifiers: list[str]
    taxa: dict[str, np.ndarray]  # task key -> (N,) ids as written
    # Rows deliberately made special (positions in labels.h5):
    temporal_missing: list[int] = field(default_factory=list)  # zeros or NaN in 'temporal'
    spatial_missing: list[int] = field(default_factory=list)  # zeros in 'spatial'
    out_of_region: list[int] = field(default_factory=list)  # in_region == 0
    sea_level: list[int] = field(default_factory=list)  # elevation 0 m (valid, not missing)

    @property
    def n_rows(self) -> int:
        return len(self.identifiers)

    def image_file(self, row: int) -> Path:
        ident = self.identifiers[row]
        return self.images_dir / (ident if ident.endswith(".jpg") else ident + ".jpg")

    def config(self, *opts: str):
        """The experiment config (``exp.yaml``) with ``--opts``-style overrides: ``config("KEY", "VALUE", ...)``."""
        from linnaeus.config import load_config

        return load_config(self.config_path, list(opts))


def write_tiny_dataset(
    root: Path,
    *,
    per_species: int = 3,
    image_size: int = 40,
    images: bool = True,
    taxonomy: bool = True,
    split_ratio: float = 0.75,
    split_seed: int = 7,
) -> TinyDataset:
    """Write labels.h5, images/, taxonomy.json and exp.yaml under ``root`` (see the module docstring)."""
    root = Path(root)
    species, genus, family = [], [], []
    for s, (g, fam) in SPECIES_CHAIN.items():
        species += [s] * per_species
        genus += [g] * per_species
        family += [fam] * per_species
    species += [0, 0, 0]
    genus += [101, 101, 0]
    family += [1000, 1000, 1001]
    n = len(species)
    identifiers = [f"img_{i:04d}.jpg" if i % 2 == 0 else f"img_{i:04d}" for i in range(n)]

    rows = np.arange(n)
    months = (rows % 12) + 1.0
    temporal = _temporal(months)
    temporal_missing = [2, 5]
    temporal[2] = 0.0
    temporal[5, 1] = np.nan
    lat = -40.0 + 3.0 * rows
    lon = -120.0 + 9.0 * rows
    spatial = _spatial(lat, lon)
    spatial_missing = [7]
    spatial[7] = 0.0
    elev = 50.0 * rows
    sea_level = [0]  # row 0 has elevation 0 m
    elevation = _elevation(elev)
    in_region = np.ones(n, np.uint8)
    out_of_region = [n - 4, n - 3]
    in_region[out_of_region] = 0

    taxa = {
        "taxa_L10": np.array(species, np.uint32),
        "taxa_L20": np.array(genus, np.uint32),
        "taxa_L30": np.array(family, np.uint32),
    }
    labels_path = write_labels_h5(
        root / "labels.h5",
        {
            "img_identifiers": identifiers,
            **taxa,
            "temporal": temporal,
            "spatial": spatial,
            "elevation_broadrange_2": elevation,
            "in_region": in_region,
            "raw_lat": lat.astype(np.float32),
            "raw_lon": lon.astype(np.float32),
            "raw_elevation": elev.astype(np.float32),
        },
        attrs={"temporal": {"column_names": TEMPORAL_COLUMNS}},
        config_json=json.dumps({"generator": "tests/conftest.py", "rows": n}),
    )
    images_dir = root / "images"
    if images:
        for i, ident in enumerate(identifiers):
            name = ident if ident.endswith(".jpg") else ident + ".jpg"
            write_jpeg(images_dir / name, image_size, ((37 * species[i]) % 200, (53 * genus[i]) % 200, 90))
    else:
        images_dir.mkdir(parents=True, exist_ok=True)
    taxonomy_path = root / "taxonomy.json"
    if taxonomy:
        taxonomy_path.write_text(json.dumps(taxonomy_doc(), indent=1))

    cfg = {
        "EXPERIMENT": {"OUTPUT_DIR": str(root / "outputs"), "NAME": "tiny"},
        "MODEL": {"IMG_SIZE": 64},
        "DATA": {
            "IMG_SIZE": 64,
            "BATCH_SIZE": 4,
            "BATCH_SIZE_VAL": 4,
            "NUM_WORKERS": 0,
            "TASK_KEYS_H5": TASK_KEYS,
            "TAXONOMY_PATH": str(taxonomy_path) if taxonomy else None,
            "HYBRID": {"IMAGES_DIR": str(images_dir), "FILE_EXTENSION": ".jpg"},
            "H5": {
                "LABELS_PATH": str(labels_path),
                "TRAIN_VAL_SPLIT_RATIO": split_ratio,
                "TRAIN_VAL_SPLIT_SEED": split_seed,
            },
            "META": {
                "ACTIVE": True,
                "COMPONENTS": {
                    "TEMPORAL": {"SOURCE": "temporal", "COLUMNS": TEMPORAL_COLUMNS, "DIM": 2, "IDX": 0},
                    "SPATIAL": {"SOURCE": "spatial", "DIM": 3, "IDX": 1},
                    "ELEVATION": {"SOURCE": "elevation_broadrange_2", "DIM": 10, "IDX": 2},
                },
            },
        },
    }
    config_path = root / "exp.yaml"
    config_path.write_text(json.dumps(cfg, indent=1))  # JSON is valid YAML
    return TinyDataset(
        root=root,
        labels_path=labels_path,
        images_dir=images_dir,
        taxonomy_path=taxonomy_path,
        config_path=config_path,
        identifiers=identifiers,
        taxa={k: v.astype(np.int64) for k, v in taxa.items()},
        temporal_missing=temporal_missing,
        spatial_missing=spatial_missing,
        out_of_region=out_of_region,
        sea_level=sea_level,
    )


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> TinyDataset:
    """A fresh tiny dataset in this test's tmp_path (24 rows, 24 JPEGs of 40×40 px, taxonomy.json, exp.yaml)."""
    return write_tiny_dataset(tmp_path / "tiny")


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset (``linnaeus demo-data`` at 30 images per species), written once per session."""
    return ensure_demo(tmp_path_factory.getbasetemp(), per_species=30)


@pytest.fixture(scope="session")
def four_step_run(demo: Path, tmp_path_factory: pytest.TempPathFactory):
    """``four_step_run(launcher)``: the run folder of ``tiny_opts(demo, ..., name=launcher, TRAIN.MAX_STEPS=4)``
    launched with ``accelerate_configs/<launcher>.yaml``, once per session on first use, shared by every test that
    asks for it (a 2-process launch is ~15 s of start-up for ~1 s of training). It validates once, at its last step,
    and checkpoints there (``checkpoints/step_4``). Read it, never write into it: copy it (``shutil.copytree``) to
    change or resume it."""
    runs: dict[str, Path] = {}

    def get(launcher: str) -> Path:
        if launcher not in runs:
            out = tmp_path_factory.mktemp(f"four_step_{launcher}")
            launch(tiny_opts(demo, out, name=launcher, TRAIN__MAX_STEPS=4), launcher)
            runs[launcher] = run_dir(out, launcher)
        return runs[launcher]

    return get


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration is marked ``integration``: ``pytest tests/unit`` (or ``-m "not
    integration"``) is the fast in-process suite; the default command runs both."""
    integration = Path(__file__).parent / "integration"
    for item in items:
        if integration in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
