"""The data layer reads a DataSpec, never the config: the import/grep rule, the spec's plain values, the one pipeline."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from linnaeus.config.resolve_data import data_spec
from linnaeus.data.stages import data_stages
from linnaeus.specs.data import DataSpec

DATA = Path(__file__).resolve().parents[2] / "linnaeus" / "data"


def _modules() -> list[Path]:
    files = sorted(DATA.rglob("*.py"))
    assert len(files) > 20  # the walk found the package
    return files


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(DATA)))
def test_data_modules_never_read_or_import_the_config(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"cfg\.", text), f"{path}: reads the config (`cfg.`); take a spec from linnaeus.specs"
    for node in ast.walk(ast.parse(text)):  # TYPE_CHECKING and function-local imports included
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        bad = [n for n in names if n == "linnaeus.config" or n.startswith("linnaeus.config.")]
        assert not bad, f"{path}:{node.lineno}: imports {bad[0]}; the data layer takes specs, never the config"


def _plain(value: object, where: str) -> None:
    if dataclasses.is_dataclass(value):
        assert type(value).__dataclass_params__.frozen, f"{where}: {type(value).__name__} is not frozen"
        for f in dataclasses.fields(value):
            _plain(getattr(value, f.name), f"{where}.{f.name}")
    elif isinstance(value, tuple):
        for i, v in enumerate(value):
            _plain(v, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, str | int | float | bool), f"{where}: {type(value).__name__}"


def test_data_spec_is_plain_frozen_values(tiny_dataset) -> None:
    spec = data_spec(
        tiny_dataset.config(
            "DATA.NUM_CLASSES_PER_LEVEL",
            "{taxa_L20: 4}",
            "DATA.HYBRID.VERIFY_IMAGES.REPORT_PATH",
            "{output_dir}/v.json",
        )
    )
    _plain(spec, "DataSpec")
    assert isinstance(spec, DataSpec) and hash(spec)
    assert spec.labels.configured("taxa_L20") == [("DATA.NUM_CLASSES_PER_LEVEL.taxa_L20", 4)]
    assert "{output_dir}" not in spec.images.verify.report_path
    assert [c.idx for c in spec.meta.components] == sorted(c.idx for c in spec.meta.components)


def test_one_pipeline_in_the_documented_order() -> None:
    names = [s.name for s in data_stages(DataSpec())]
    assert names == [
        "storage rules",
        "inspect_labels",
        "make_split",
        "split_problems",
        "observations",
        "examine_taxonomy",
        "build_class_maps",
        "num_classes_problems",
        "split_image_paths",
        "verify_images",
    ]
