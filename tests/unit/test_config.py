"""Config loading: every shipped YAML, the user guide's example, BASE chains, --opts, aliases and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from linnaeus.config import dump_config, load_config, load_config_with_provenance, repo_root
from linnaeus.errors import ConfigError

ROOT = repo_root()
SEED_EXAMPLE = ROOT / "configs/experiments/my_custom_experiment.yaml"


def all_configs() -> list[Path]:
    return sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", all_configs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg


def test_user_guide_example_as_written(tmp_path: Path) -> None:
    """The guide's YAML block, only its paths changed, loads with the meaning the guide gives its keys."""
    guide = Path(ROOT.parent / "shared/seed/training_custom_model_example.md")
    if not guide.is_file():
        pytest.skip("shared/seed is not beside this checkout")
    text = guide.read_text()
    block = text.split("```yaml", 1)[1].split("```", 1)[0]
    block = block.replace("/path/to/your/", str(tmp_path) + "/")
    exp = tmp_path / "my_custom_experiment.yaml"
    exp.write_text(block)
    cfg = load_config(exp)
    assert cfg.MODEL.NAME == "mFormerV1_sm"  # inherited through BASE, relative to the repo root
    assert cfg.MODEL.IMG_SIZE == 384 == cfg.DATA.IMG_SIZE
    assert cfg.MODEL.CLASSIFICATION.HEADS["taxa_L10"].NUM_CLASSES == 150
    assert cfg.MODEL.CLASSIFICATION.HEADS["taxa_L20"].LOSS.PARAMS == {"label_smoothing": 0.1}
    assert cfg.DATA.META.COMPONENTS["ELEVATION"].DIM == 10
    assert cfg.DATA.H5.LABELS_PATH == f"{tmp_path}/custom_labels.h5"
    assert cfg.TRAIN.AMP_OPT_LEVEL == "O1"
    assert cfg.EXPERIMENT.WANDB.ENABLED is True
    # The guide's command line override: TRAIN.BATCH_SIZE is the per-process batch size.
    cfg = load_config(exp, ["TRAIN.BATCH_SIZE", "32", "EXPERIMENT.WANDB.ENABLED", "False"])
    assert cfg.DATA.BATCH_SIZE == 32
    assert cfg.EXPERIMENT.WANDB.ENABLED is False


def test_base_chain_relative_paths_and_override_order(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/a.yaml").write_text("TRAIN: {EPOCHS: 3, CLIP_GRAD: 1.0}\nDATA: {BATCH_SIZE: 8}\n")
    (tmp_path / "b.yaml").write_text("BASE: ['sub/a.yaml']\nTRAIN: {EPOCHS: 4}\n")
    (tmp_path / "exp.yaml").write_text(
        "BASE: ['b.yaml', 'configs/model/archs/mFormerV1/mFormerV1_md.yaml']\nDATA: {BATCH_SIZE: 16}\n"
    )
    cfg = load_config(tmp_path / "exp.yaml", ["TRAIN.CLIP_GRAD", "2.5"])
    assert cfg.TRAIN.EPOCHS == 4  # b overrides a
    assert cfg.DATA.BATCH_SIZE == 16  # the experiment overrides its bases
    assert cfg.TRAIN.CLIP_GRAD == 2.5  # --opts override everything, YAML-typed
    assert cfg.MODEL.ROPE_STAGES.DEPTHS == [10, 2]  # repo-root relative base


def test_opts_values_are_yaml_typed() -> None:
    cfg = load_config(SEED_EXAMPLE, ["DATA.TASK_KEYS_H5", "[taxa_L10]", "MODEL.CLASSIFICATION.HEADS", "{}"])
    assert cfg.DATA.TASK_KEYS_H5 == ["taxa_L10"]
    cfg = load_config(None, ["TRAIN.AUTO_RESUME", "false", "LR_SCHEDULER.BASE_LR", "3e-4"])
    assert cfg.TRAIN.AUTO_RESUME is False
    assert cfg.LR_SCHEDULER.BASE_LR == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("opts", "expected"),
    [
        (["DATA.IMG_SIZ", "384"], "DATA.IMG_SIZ (from --opts): unknown key; did you mean DATA.IMG_SIZE?"),
        (["TRAIN.EPOCH", "3"], "did you mean TRAIN.EPOCHS?"),
        (
            ["MODEL.CLASSIFICATION.HEADS.taxa_L10.NUM_CLASS", "3"],
            "did you mean MODEL.CLASSIFICATION.HEADS.taxa_L10.NUM_CLASSES?",
        ),
        (["DATA.BATCH_SIZE", "lots"], "DATA.BATCH_SIZE (from --opts): Input should be a valid integer"),
        (["DATA.IMG_SIZE", "224"], "DATA.IMG_SIZE (224) must equal MODEL.IMG_SIZE (384)"),
        (["DATA.TASK_KEYS_H5", "[taxa_L10, taxa_L20, taxa_L30]"], "'taxa_L30' has no head"),
        (["DATA.META.COMPONENTS.SPATIAL.COLUMNS", "[x, y]"], "DATA.META.COMPONENTS.SPATIAL.DIM (from "),
        (["TRAIN.AMP_OPT_LEVEL", "O7"], "TRAIN.AMP_OPT_LEVEL (from --opts): Input should be 'O0', 'O1', 'O2' or 'O3'"),
        (["BASE", "[x.yaml]"], "BASE (from --opts): inheritance can only be set in YAML files"),
        (["DATA.BATCH_SIZE"], "--opts: expected KEY VALUE pairs"),
    ],
)
def test_bad_values_fail_with_one_line(opts: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(SEED_EXAMPLE, opts)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_error_names_the_file_a_key_came_from(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("DATA: {IMG_SIZE: 256}\n")
    (tmp_path / "exp.yaml").write_text("BASE: [base.yaml]\nDATA: {BATCH_SIZE: 4}\nMODEL: {IMG_SIZE: 224}\n")
    with pytest.raises(ConfigError, match=r"DATA\.IMG_SIZE \(from .*base\.yaml\)"):
        load_config(tmp_path / "exp.yaml")
    (tmp_path / "typo.yaml").write_text("BASE: [base.yaml]\nOPTIMIZER: {WEIGHT_DECAI: 0.1}\n")
    with pytest.raises(
        ConfigError,
        match=r"OPTIMIZER\.WEIGHT_DECAI \(from .*typo\.yaml\): unknown key; did you mean OPTIMIZER\.WEIGHT_DECAY\?",
    ):
        load_config(tmp_path / "typo.yaml")


def test_base_cycle_and_missing_base_are_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("BASE: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("BASE: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"inheritance cycle .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("BASE: [nowhere.yaml]\n")
    with pytest.raises(ConfigError, match=r"BASE \(from .*c.yaml\): 'nowhere.yaml' not found"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "bad.yaml").write_text("DATA: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line .*not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_compat_no_op_keys_are_accepted_with_one_warning_each() -> None:
    opts = ["DATA.USE_VECTORIZED_PROCESSOR", "True", "MODEL.EXTRA_TOKEN_NUM", "4", "MODEL.USE_FLASH_ATTN", "True"]
    cfg, prov = load_config_with_provenance(None, opts)
    assert cfg == load_config(None)  # no meaning here
    assert [w.split(" ")[0] for w in prov.warnings] == opts[::2]
    assert all("(from --opts): ignored: " in w for w in prov.warnings)


def test_dump_is_plain_yaml_without_base() -> None:
    cfg = load_config(SEED_EXAMPLE)
    data = yaml.safe_load(dump_config(cfg))
    assert "BASE" not in data
    assert data["DATA"]["TASK_KEYS_H5"] == ["taxa_L10", "taxa_L20"]


def test_cli_lists_every_subcommand() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "linnaeus", "--help"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    for name in ("train", "shard", "check", "predict", "export", "demo-data", "bench", "config"):
        assert name in out
    for name in ("train", "shard", "check", "predict", "export", "demo-data", "bench", "config"):
        sub = subprocess.run(
            [sys.executable, "-m", "linnaeus", name, "--help"], capture_output=True, text=True, cwd=ROOT
        )
        assert sub.returncode == 0, sub.stderr
        assert "usage: linnaeus" in sub.stdout


def test_train_module_reports_config_errors_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "linnaeus.train", "--cfg", str(SEED_EXAMPLE), "--opts", "DATA.BATCH_SIZ", "3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: DATA.BATCH_SIZ (from --opts): unknown key; did you mean DATA.BATCH_SIZE?"


def test_a_base_listed_many_times_at_every_level_is_read_once(tmp_path: Path) -> None:
    """Issue 26: a BASE file listing the next one 10 times, 8 levels deep (10^8 reads) hung."""
    import time

    (tmp_path / "l8.yaml").write_text("TRAIN:\n  EPOCHS: 7\n")
    for level in range(7, -1, -1):
        bases = ", ".join([f"l{level + 1}.yaml"] * 10)
        (tmp_path / f"l{level}.yaml").write_text(f"BASE: [{bases}]\nEXPERIMENT:\n  NAME: level{level}\n")
    start = time.perf_counter()
    cfg = load_config(tmp_path / "l0.yaml")
    assert time.perf_counter() - start < 30
    assert cfg.TRAIN.EPOCHS == 7 and cfg.EXPERIMENT.NAME == "level0"
    assert len(cfg.BASE_RESOLVED) == 8  # each distinct file once, in merge order
    assert cfg.BASE_RESOLVED[0].endswith("l8.yaml") and cfg.BASE_RESOLVED[-1].endswith("l1.yaml")


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_a_config_that_is_not_a_regular_file_is_refused_in_one_line(tmp_path: Path, special: str) -> None:
    """Issue 26: `--cfg /dev/zero` read until MemoryError (a FIFO would block forever)."""
    import os

    path = Path(special)
    if special == "fifo":
        path = tmp_path / "cfg.yaml"
        os.mkfifo(path)
    with pytest.raises(ConfigError, match="is not a regular file") as err:
        load_config(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_huge_config_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as fh:
        fh.truncate(64 << 20)  # sparse: nothing is written
    with pytest.raises(ConfigError, match="over 16 MB"):
        load_config(path)


def _every_key(model: type, prefix: str = "") -> list[str]:
    """Every leaf key of the schema; open maps (HEADS, COMPONENTS) walked through one example name."""
    import typing

    from pydantic import BaseModel

    keys = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        args = typing.get_args(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _every_key(ann, f"{prefix}{name}.")
        elif typing.get_origin(ann) is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
            keys += _every_key(args[1], f"{prefix}{name}.example.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_config_explain_describes_every_key() -> None:
    from linnaeus.commands.config import explain_lines
    from linnaeus.config.defaults import Config

    keys = _every_key(Config)
    assert len(keys) > 150 and "DATA.IMG_SIZE" in keys and "MODEL.CLASSIFICATION.HEADS.example.USE_BIAS" in keys
    undescribed = []
    for key in keys:
        lines = explain_lines(key)
        meaning = lines[0].split(": ", 1)[1]
        if "see docs" in meaning or not meaning.strip():
            undescribed.append(key)
        assert [line.split(":")[0].strip() for line in lines[1:]] == ["type", "default", "allowed"], lines
    assert not undescribed, f"{len(undescribed)} keys without a description: {undescribed}"
    assert explain_lines("LR_SCHEDULER.NAME")[-1] == '  allowed: "cosine", "wsd", "constant"'
    assert explain_lines("DATA.NUM_WORKERS")[-1] == "  allowed: >= 0"
