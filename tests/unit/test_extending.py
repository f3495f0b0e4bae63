"""The extension recipe in docs/design.md works as written: its model, head and loss register, pass the config
schema, build through the real builders and train two optimizer steps on real data. Also: registry lookups and
their one-line errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.utils.data import DataLoader

from linnaeus.aug import eval_transform
from linnaeus.config import load_config, repo_root
from linnaeus.config.resolve_data import data_spec
from linnaeus.config.resolve_model import loss_spec, model_spec
from linnaeus.data.prepare import prepare_data
from linnaeus.errors import ConfigError
from linnaeus.losses import build_task_loss, list_criteria, needs_distance_matrices
from linnaeus.models import build_backbone, build_model, list_heads, list_models
from linnaeus.registry import Registry

DESIGN = repo_root() / "docs" / "design.md"


def _section_blocks(lang: str) -> list[str]:
    text = DESIGN.read_text()
    section = text.split("\n## Extending Linnaeus", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def doc_parts() -> dict[str, type]:
    """Run the three python blocks of the recipe that define parts once, as the user's own modules would be
    imported (the fourth, the launch script, is run for real by tests/integration/test_extending_script.py)."""
    blocks = [b for b in _section_blocks("python") if "linnaeus.train" not in b]
    assert len(blocks) == 3
    names = {}
    for i, code in enumerate(blocks):
        namespace: dict = {"__name__": f"doc_extension_example_{i}"}
        exec(compile(code, f"{DESIGN}#extending-block-{i}", "exec"), namespace)
        names.update({k: v for k, v in namespace.items() if k in ("TinyCNN", "CosineHead", "SiblingSmoothing")})
    assert set(names) == {"TinyCNN", "CosineHead", "SiblingSmoothing"}
    return names


@pytest.fixture
def doc_experiment(doc_parts, tiny_dataset):
    (yaml_block,) = _section_blocks("yaml")
    exp = tiny_dataset.root / "extended.yaml"
    exp.write_text("BASE: [exp.yaml]\n" + yaml_block)
    return exp


def test_registered_names_are_listed_and_accepted_by_the_schema(doc_parts, doc_experiment) -> None:
    assert "TinyCNN" in list_models() and {"mFormerV1", "mFormerV0"} <= set(list_models())
    assert "CosineHead" in list_heads() and "LinearHead" in list_heads()
    assert "SiblingSmoothing" in list_criteria() and "CrossEntropyLoss" in list_criteria()
    cfg = load_config(doc_experiment)
    assert cfg.MODEL.TYPE == "TinyCNN" and cfg.MODEL.PARAMS == {"width": 16}
    assert cfg.MODEL.CLASSIFICATION.HEADS["taxa_L10"].LOSS.TYPE == "SiblingSmoothing"
    assert needs_distance_matrices(loss_spec(cfg))
    plain = load_config(doc_experiment, ["MODEL.CLASSIFICATION.HEADS.taxa_L10.LOSS", "{}"])
    assert not needs_distance_matrices(loss_spec(plain))


@pytest.mark.parametrize(
    ("opts", "expected"),
    [
        (
            ["MODEL.TYPE", "TinyCN"],
            "MODEL.TYPE (from --opts): unknown model; did you mean 'TinyCNN'? expected one of [",
        ),
        (
            ["MODEL.CLASSIFICATION.HEADS.taxa_L20.TYPE", "CosinHead"],
            "MODEL.CLASSIFICATION.HEADS.taxa_L20.TYPE (from --opts): unknown head type; did you mean 'CosineHead'?",
        ),
        (
            ["MODEL.CLASSIFICATION.HEADS.taxa_L20.LOSS.TYPE", "SiblingSmooth"],
            "HEADS.taxa_L20.LOSS.TYPE (from --opts): unknown loss; did you mean 'SiblingSmoothing'?",
        ),
    ],
)
def test_unknown_names_fail_at_config_load_in_one_line(doc_parts, doc_experiment, opts, expected) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(doc_experiment, opts)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert message.endswith(f", got '{opts[1]}'")


def test_doc_parts_train_two_steps_through_the_real_builders(doc_parts, doc_experiment) -> None:
    torch.manual_seed(0)
    cfg = load_config(doc_experiment)
    data = prepare_data(data_spec(cfg))
    hierarchy = {k: torch.as_tensor(v) for k, v in data.hierarchy_matrices().items()}
    model = build_model(model_spec(cfg), data.task_keys, data.num_classes, data.meta_dims, hierarchy)
    assert isinstance(model.backbone, doc_parts["TinyCNN"]) and model.backbone.num_features == 16
    assert isinstance(model.head.heads["taxa_L10"], doc_parts["CosineHead"])
    assert model.head.heads["taxa_L10"].scale == 16.0
    task_loss = build_task_loss(loss_spec(cfg), data.task_keys, data.num_classes, data.distance_matrices(), None)
    criterion = task_loss.criteria["taxa_L10"]
    assert isinstance(criterion, doc_parts["SiblingSmoothing"])
    # Every class of the tiny taxonomy has a sibling species, so each keeps 1 - eps and the rows stay distributions.
    targets = criterion.hard(torch.arange(data.num_classes["taxa_L10"]))
    assert torch.allclose(targets.sum(dim=1), torch.ones(len(targets)))
    assert torch.allclose(targets.diagonal(), torch.full((len(targets),), 0.8))

    loader = DataLoader(data.dataset("train", train=True), batch_size=8, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _, batch in zip(range(2), loader, strict=False):
        images = eval_transform(batch["image"], cfg.AUG.MEAN, cfg.AUG.STD)
        logits = model(images, batch["meta"])
        assert logits["taxa_L10"].shape == (len(images), data.num_classes["taxa_L10"])
        total, per_task = task_loss(logits, batch["targets"])
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total.detach()))
        assert set(per_task) == set(data.task_keys)
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    for name in ("backbone.conv.weight", "backbone.meta.weight", "head.heads.taxa_L10.weight"):
        assert not torch.equal(before[name], dict(model.named_parameters())[name]), name


def test_model_arguments_are_checked_by_the_models_own_from_spec(doc_parts, doc_experiment) -> None:
    cfg = load_config(doc_experiment, ["MODEL.PARAMS", "{width: 0}"])
    with pytest.raises(ConfigError, match=r"^MODEL\.PARAMS\.width: expected a positive integer, got 0$"):
        build_backbone(model_spec(cfg), [])


def test_registry_lookup_errors_and_duplicates() -> None:
    table: Registry[type] = Registry("widget", "linnaeus.models")

    @table.register("Gear")
    class Gear:
        pass

    assert table.get("Gear", "X.TYPE") is Gear
    table.register("Gear")(Gear)  # registering the same object again is harmless (module reloads)
    with pytest.raises(ValueError, match="widget 'Gear' is already registered"):
        table.register("Gear")(type("Other", (), {}))
    with pytest.raises(ConfigError, match=r"^X\.TYPE: unknown widget 'Gears'; did you mean 'Gear'\? expected one of"):
        table.get("Gears", "X.TYPE")
