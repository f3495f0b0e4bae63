"""The model, loss and augmentation layers read the config only through their specs (issue 23).

``grep -rn "cfg\\." linnaeus/models linnaeus/losses linnaeus/aug`` finds nothing, none of their modules imports
``linnaeus.config`` (not even under TYPE_CHECKING), and the specs ``linnaeus.config.resolve_model`` builds are plain
frozen values that share nothing mutable with the config.
"""

from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

import pytest
from pydantic import BaseModel

from linnaeus.config import load_config, repo_root
from linnaeus.config.defaults import HeadConfig, HeadLossConfig
from linnaeus.config.resolve_model import aug_spec, head_loss_spec, head_spec, loss_spec, model_spec
from linnaeus.specs.model import HeadLossSpec, HeadSpec

LAYERS = ("models", "losses", "aug")
PACKAGE = Path(__file__).resolve().parents[2] / "linnaeus"


def _modules() -> list[Path]:
    files = [f for layer in LAYERS for f in sorted((PACKAGE / layer).rglob("*.py"))]
    assert len(files) > 20  # the walk found the layers
    return files


def test_no_config_attribute_is_read_in_the_model_loss_and_aug_layers() -> None:
    hits = [
        f"{f.relative_to(PACKAGE.parent)}:{n}"
        for f in _modules()
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if "cfg." in line
    ]
    assert hits == []


def _imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):  # every import, including those under `if TYPE_CHECKING:` and inside functions
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_model_loss_and_aug_layers_never_import_the_config_package() -> None:
    offenders = {}
    for f in _modules():
        bad = sorted(m for m in _imported_modules(ast.parse(f.read_text())) if m.startswith("linnaeus.config"))
        if bad:
            offenders[str(f.relative_to(PACKAGE.parent))] = bad
    assert offenders == {}


def test_the_import_check_sees_type_checking_imports() -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from linnaeus.config.defaults import AugConfig\n"
    assert "linnaeus.config.defaults" in _imported_modules(ast.parse(source))


def test_spec_defaults_equal_the_config_defaults() -> None:
    # The builder and the loss use HeadSpec() / HeadLossSpec() for a task with no configured head.
    assert HeadSpec() == head_spec(HeadConfig())
    assert HeadLossSpec() == head_loss_spec(HeadLossConfig())


def _walk(value, path: str = "spec"):
    yield path, value
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _walk(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{path}[{k!r}]")
    elif isinstance(value, tuple | list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")


@pytest.mark.parametrize("experiment", ["demo.yaml", "generic_mformer_example.yaml", "frozen_vit_example.yaml"])
def test_specs_are_frozen_plain_values_detached_from_the_config(experiment: str) -> None:
    cfg = load_config(repo_root() / "configs" / "experiments" / experiment)
    for spec in (model_spec(cfg), loss_spec(cfg), aug_spec(cfg)):
        for path, value in _walk(spec):
            assert not isinstance(value, BaseModel), path
            assert not isinstance(value, list), f"{path}: lists become tuples"
            if dataclasses.is_dataclass(value):
                assert value.__dataclass_params__.frozen, path
        assert pickle.loads(pickle.dumps(spec)) == spec
    spec = model_spec(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.img_size = 1  # type: ignore[misc]
    spec.params["added"] = 1  # an open map is a copy: the config does not change
    assert "added" not in cfg.MODEL.PARAMS
    assert spec.rope_stages.dims == tuple(cfg.MODEL.ROPE_STAGES.DIMS)
    assert aug_spec(cfg).mean == tuple(cfg.AUG.MEAN)
