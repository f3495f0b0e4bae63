"""A bundle is verified before its weights load: sha256 against bundle.json, sizes against the class maps and the
metadata encoders, every tensor shape against the model; each mismatch is one line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import write_jpeg, write_tiny_dataset
from fake_runs import HEADS, TINY_MODEL, fake_run
from safetensors.torch import load_file, save_file

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
    """Loading gives back exactly the exported weights, class maps and sizes, in a model that predicts."""
    import torch

    loaded = Bundle.load(bundle)
    exported = load_file(str(bundle / "weights.safetensors"))
    assert loaded.state_dict.keys() == exported.keys()
    assert all(torch.equal(loaded.state_dict[k], exported[k]) for k in exported)
    info = json.loads((bundle / "bundle.json").read_text())
    assert loaded.num_classes == info["num_classes"] and loaded.meta_dims == info["meta_dims"]
    doc = json.loads((bundle / "class_maps.json").read_text())
    assert {k: len(m) for k, m in loaded.class_maps.items()} == {k: len(doc[k]["classes"]) for k in doc}
    model = loaded.build_model()
    assert not model.training
    model_sd = model.state_dict()
    assert all(torch.equal(model_sd[k], exported[k]) for k in exported)


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
    # ...and its recorded sha256 of class_maps.json, so the whole edit is consistent.
    _json(
        copy / "bundle.json",
        lambda d: d["files_sha256"].__setitem__("class_maps.json", sha256_file(copy / "class_maps.json")),
    )
    assert sha256_file(copy / "weights.safetensors") == json.loads((copy / "bundle.json").read_text())["weights_sha256"]
    with pytest.raises(DataError, match=r"weight .* has shape \[.*\] but the model built from its config"):
        Bundle.load(copy).build_model()


@pytest.mark.parametrize("name", ["taxonomy.json", "class_maps.json", "config.yaml", "preprocessing.json"])
def test_every_bundle_file_is_covered_by_its_hash(copy: Path, name: str, capsys) -> None:
    """Issue 26: taxonomy.json and the class names were outside the bundle hash: a renamed species went unnoticed."""
    path = copy / name
    text = path.read_text()
    if name == "class_maps.json":
        doc = json.loads(text)
        doc["taxa_L10"]["classes"][0]["name"] = "Renamed species"
        path.write_text(json.dumps(doc))
    elif name == "taxonomy.json":
        path.write_text(text.replace("Apis mellifera", "Apis renamed"))
    elif name == "preprocessing.json":
        _json(path, lambda d: d["metadata"]["components"][0].__setitem__("name", "EDITED"))
    else:
        path.write_text(text + "\n# edited\n")
    assert path.read_text() != text
    with pytest.raises(DataError, match=rf"{name}: sha256 .* does not match bundle.json's files_sha256"):
        Bundle.load(copy)
    assert main(["predict", "--bundle", str(copy), str(write_jpeg(copy.parent / "x.jpg")), "--device", "cpu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "files_sha256" in err[0]


def test_nan_weights_are_refused_at_load_and_at_export(copy: Path, tmp_path: Path, capsys) -> None:
    """Issue 26: a bundle with NaN weights predicted (scores null) and exited 0."""
    import torch

    weights = load_file(str(copy / "weights.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(copy / "weights.safetensors"))
    _json(copy / "bundle.json", lambda d: d.__setitem__("weights_sha256", sha256_file(copy / "weights.safetensors")))
    with pytest.raises(DataError, match=rf"weight {name} holds \d+ non-finite values"):
        Bundle.load(copy)
    assert main(["predict", "--bundle", str(copy), str(write_jpeg(tmp_path / "x.jpg")), "--device", "cpu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "non-finite" in err[0]

    # A run whose exported weights hold NaN is not bundled.
    run = tmp_path / "run"
    ds = write_tiny_dataset(tmp_path / "data", per_species=3)
    fake_run(ds.config(*TINY_MODEL, *HEADS), run)
    final = load_file(str(run / "export" / "final.safetensors"))
    final[name] = torch.full_like(final[name], float("inf"))
    save_file(final, str(run / "export" / "final.safetensors"), metadata={"step": "7"})
    with pytest.raises(DataError, match="non-finite"):
        export_bundle(run, tmp_path / "nan_bundle", assume_encodings=True)
    assert not (tmp_path / "nan_bundle").exists()


def test_a_best_checkpoint_named_outside_the_run_is_refused(tmp_path: Path) -> None:
    from linnaeus.inference.bundle import resolve_weights

    run = tmp_path / "run"
    fake_run(write_tiny_dataset(tmp_path / "data", per_species=3).config(*TINY_MODEL, *HEADS), run)
    step = run / "checkpoints" / "step_7"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 7, "best_checkpoints": [{"dir": "../../../x"}]}))
    (run / "checkpoints" / "latest").write_text("step_7\n")
    with pytest.raises(DataError, match=r"best checkpoint '\.\./\.\./\.\./x' is not a step_<N> folder"):
        resolve_weights(run, "best")
