"""A bundle is verified before its weights load: sha256 against bundle.json, sizes against the class maps and the
metadata encoders, every tensor shape against the model; each mismatch is one line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import write_jpeg, write_tiny_dataset
from safetensors.torch import load_file, save_file
from test_inference import HEADS, TINY_MODEL, fake_run

from linnaeus.cli import main
from linnaeus.errors import DataError
from linnaeus.inference.bundle import Bundle, export_bundle, sha256_file


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    ds = write_tiny_dataset(root / "data", per_species=3)
    fake_run(ds.config(*TINY_MODEL, *HEADS), root / "run")
    return export_bundle(root / "run", root / "bundle", assume_encodings=True)


@pytest.fixture
def copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def _json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_intact_bundle_loads(bundle: Path) -> None:
    Bundle.load(bundle).build_model()


def test_tampered_weights_are_refused_by_sha256(copy: Path, capsys) -> None:
    weights = load_file(str(copy / "weights.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, str(copy / "weights.safetensors"))
    with pytest.raises(DataError, match=r"does not match bundle.json's weights_sha256"):
        Bundle.load(copy)
    assert main(["predict", "--bundle", str(copy), str(write_jpeg(copy.parent / "x.jpg")), "--device", "cpu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "weights_sha256" in err[0]


def test_class_map_with_one_class_fewer_is_refused(copy: Path) -> None:
    _json(copy / "class_maps.json", lambda d: d["taxa_L10"]["classes"].pop())
    with pytest.raises(DataError, match=r"class_maps.json: taxa_L10 has \d+ classes but bundle.json records"):
        Bundle.load(copy)


def test_changed_metadata_width_is_refused(copy: Path) -> None:
    def widen(doc):
        comp = doc["metadata"]["components"][0]
        comp["dim"] = comp["dim"] + 1

    _json(copy / "preprocessing.json", widen)
    with pytest.raises(DataError, match=r"metadata widths .* differ from bundle.json"):
        Bundle.load(copy)


def test_consistent_but_wrong_sizes_are_caught_by_tensor_shapes(copy: Path) -> None:
    # class map and bundle.json both edited (sha256 of the weights still fine): the head's shape gives it away.
    _json(copy / "class_maps.json", lambda d: d["taxa_L10"]["classes"].pop())
    _json(copy / "bundle.json", lambda d: d["num_classes"].__setitem__("taxa_L10", d["num_classes"]["taxa_L10"] - 1))
    assert sha256_file(copy / "weights.safetensors") == json.loads((copy / "bundle.json").read_text())["weights_sha256"]
    with pytest.raises(DataError, match=r"weight .* has shape \[.*\] but the model built from its config"):
        Bundle.load(copy).build_model()
