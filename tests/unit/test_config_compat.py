"""Coming from Polli Linnaeus: its config files load (mapped or warned key by key), BASE prefers the user's copy,
metadata components merge key by key, every problem is listed at once, and `linnaeus config` renders, validates,
explains and migrates. The prior system's files are in tests/fixtures/polli (see the README there)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from linnaeus.cli import main
from linnaeus.commands.config import migrated_text, render_text
from linnaeus.config import default_config, dump_config, load_config, load_config_with_provenance, repo_root
from linnaeus.config.defaults import Ramp
from linnaeus.config.loader import problems_of, schema_kind
from linnaeus.config.resolve_model import model_spec
from linnaeus.errors import ConfigError

POLLI = Path(__file__).resolve().parents[1] / "fixtures/polli"
V1 = ["mFormerV1_sm", "mFormerV1_md", "mFormerV1_lg", "mFormerV1_xl"]
V0 = ["mFormerV0_sm", "mFormerV0_md", "mFormerV0_lg"]


def arch_file(root: Path, name: str) -> Path:
    return root / "configs/model/archs" / name[:9] / f"{name}.yaml"


@pytest.fixture
def polli_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the prior system's config tree as the working directory (as a user of it would run)."""
    root = tmp_path / "checkout"
    shutil.copytree(POLLI / "configs", root / "configs")
    monkeypatch.chdir(root)
    return root


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out += _leaves(v, key) if isinstance(v, dict) and v else [key]
    return out


def test_every_key_of_the_prior_default_config_is_honoured_mapped_or_warned_once() -> None:
    path = POLLI / "default_config.yaml"
    cfg, prov = load_config_with_provenance(path)
    warned = [w.split(" (from ")[0] for w in prov.warnings]
    assert len(warned) == len(set(warned)), "one warning line per key"
    keys = _leaves(yaml.safe_load(path.read_text()))
    assert len(keys) > 340
    for key in keys:
        assert schema_kind(key) is not None or key in warned, key
    # Keys with the same meaning keep their value.
    assert cfg.DATA.BATCH_SIZE == 64 and cfg.TRAIN.EPOCHS == 300 and cfg.AUG.RANDOM_ERASE.AREA_RANGE == [0.02, 0.4]
    assert cfg.OPTIMIZER.BETAS == [0.9, 0.999]  # AdEMAMix's third beta dropped, with a warning
    assert cfg.MODEL.TYPE == "mFormerV0"


@pytest.mark.parametrize("name", V1 + V0)
def test_prior_arch_files_build_our_architecture_of_the_same_name(name: str) -> None:
    import torch

    from linnaeus.models import build_backbone

    prior, prov = load_config_with_provenance(arch_file(POLLI, name))
    ours = load_config(arch_file(repo_root(), name))
    assert prior.MODEL == ours.MODEL
    assert prov.warnings and all("(from " in w for w in prov.warnings)

    def params(cfg) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in build_backbone(model_spec(cfg), [2, 3, 10]).parameters())

    n = params(prior)
    assert n == params(ours)
    if name == "mFormerV0_lg":  # the prior system's measured size with three metadata components
        assert 87e6 < n < 90e6


def test_typos_still_fail_with_the_nearest_key(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("MODEL:\n  DROP_PTH_RATE: 0.1\n  AGGREGATON: {TYPE: Conv1d}\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "x.yaml")
    problems = problems_of(err.value)
    assert "MODEL.DROP_PTH_RATE (from x.yaml): unknown key; did you mean MODEL.DROP_PATH_RATE?" in problems[0] or any(
        "did you mean MODEL.DROP_PATH_RATE?" in p for p in problems
    )
    assert any(p.startswith("MODEL.AGGREGATON") for p in problems)


def test_prior_values_that_change_the_architecture_are_refused(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text(
        "MODEL:\n  TYPE: mFormerV0\n  ATTENTION_STAGES:\n    STRIDE_SEQS: [[1, 2, 1], [2, 1]]\n"
        "  NORMALIZATION: {ACTIVATION_LAYER: SiLU}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "x.yaml")
    problems = problems_of(err.value)
    assert len(problems) == 2
    assert "MODEL.ATTENTION_STAGES.STRIDE_SEQS" in problems[0] and "is not built here" in problems[0]
    assert "MODEL.NORMALIZATION.ACTIVATION_LAYER" in problems[1] and "'SiLU'" in problems[1]
    # What one model type builds is not accepted for the other.
    (tmp_path / "y.yaml").write_text("MODEL:\n  TYPE: mFormerV1\n  NORMALIZATION: {CONV_NORM_LAYER: BatchNorm2d}\n")
    with pytest.raises(ConfigError, match=r"CONV_NORM_LAYER .*'BatchNorm2d' is not built here"):
        load_config(tmp_path / "y.yaml")


def test_zero_steps_mean_unset_where_the_prior_file_means_it(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text(
        "LR_SCHEDULER: {WARMUP_EPOCHS: 2.0, WARMUP_STEPS: 0, WARMUP_FRACTION: None}\n"
        "SCHEDULE:\n  MIX: {PROB: {ENABLED: True, END_FRACTION: 0.5, END_STEPS: 0}}\n"
        "  META_MASKING: {END_STEPS: 0, END_FRACTION: 0.4}\n"
        "  VALIDATION: {INTERVAL_EPOCHS: 2, INTERVAL_STEPS: 0}\n"
    )
    cfg, prov = load_config_with_provenance(tmp_path / "x.yaml")
    assert cfg.LR_SCHEDULER.WARMUP_STEPS is None and cfg.LR_SCHEDULER.WARMUP_EPOCHS == 2.0
    assert cfg.SCHEDULE.MIX.PROB.END_STEPS is None and cfg.SCHEDULE.MIX.PROB.END_FRACTION == 0.5
    assert cfg.SCHEDULE.META_MASKING.END_FRACTION == 0.4
    assert cfg.SCHEDULE.VALIDATION.INTERVAL.EPOCHS == 2 and cfg.SCHEDULE.VALIDATION.INTERVAL.STEPS is None
    assert any(
        w.startswith("LR_SCHEDULER.WARMUP_STEPS (from ") and "x.yaml): 0 means unset" in w for w in prov.warnings
    )
    # Our own meaning of END_STEPS: 0 alone (no ramp) is kept.
    assert load_config(None, ["SCHEDULE.META_MASKING.END_STEPS", "0"]).SCHEDULE.META_MASKING.END_STEPS == 0


def test_prior_loss_and_weighting_lists_become_per_head_settings(polli_checkout: Path) -> None:
    cfg = load_config(polli_checkout / "configs/experiments/generic_mformer_example.yaml")
    heads = cfg.MODEL.CLASSIFICATION.HEADS
    assert list(heads) == ["taxa_L10", "taxa_L20", "taxa_L30", "taxa_L40"]
    for key, weight in zip(heads, [0.5, 1.0, 1.5, 2.0], strict=True):
        assert heads[key].TYPE == "ConditionalClassifier" and heads[key].ROUTING == "soft"
        assert heads[key].LOSS.TYPE == "TaxonomyAwareLabelSmoothing"
        assert heads[key].LOSS.PARAMS == {"alpha": 0.1, "beta": 1.0}
        assert heads[key].LOSS.WEIGHT == weight
    assert cfg.LOSS.GRADNORM.ENABLED is False
    assert (cfg.LOSS.CLASS_WEIGHTING.TYPE, cfg.LOSS.CLASS_WEIGHTING.CAP) == ("capping", 10.0)
    assert cfg.DATA.REQUIRE_ALL_RANKS is False  # PARTIAL.LEVELS True keeps rows with null ranks
    assert cfg.SCHEDULE.MIX.GROUP_LEVEL == "taxa_L10" and cfg.SCHEDULE.CHECKPOINT.KEEP_BEST_N == 5
    assert cfg.LR_SCHEDULER.BASE_LR == pytest.approx(5e-5) and cfg.LR_SCHEDULER.WARMUP_EPOCHS == 10.0
    assert cfg.MODEL.NAME == "mFormerV1_sm" and cfg.MODEL.DROP_PATH_RATE == 0.01  # MODEL.BASE, then the file
    assert cfg.EXPERIMENT.OUTPUT_DIR == "/path/to/output"


def test_a_users_base_copy_wins_over_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkout = tmp_path / "my_checkout"
    user_arch = arch_file(checkout, "mFormerV1_sm")
    user_arch.parent.mkdir(parents=True)
    user_arch.write_text(
        arch_file(repo_root(), "mFormerV1_sm").read_text().replace("DROP_PATH_RATE: 0.2", "DROP_PATH_RATE: 0.07")
    )
    exp = checkout / "configs/experiments/exp.yaml"
    exp.parent.mkdir(parents=True)
    exp.write_text("BASE: ['configs/model/archs/mFormerV1/mFormerV1_sm.yaml']\nTRAIN: {EPOCHS: 3}\n")
    for cwd in (checkout, tmp_path):  # from the checkout, and from elsewhere (the folders above the file)
        monkeypatch.chdir(cwd)
        cfg, prov = load_config_with_provenance(exp)
        assert cfg.MODEL.DROP_PATH_RATE == 0.07
        assert cfg.BASE_RESOLVED == [str(user_arch.resolve())] == prov.bases
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg  # the resolved BASE list loads back
    # Without a user copy, this repository's file is the fallback.
    user_arch.unlink()
    assert load_config(exp).BASE_RESOLVED == [str(arch_file(repo_root(), "mFormerV1_sm").resolve())]


def test_metadata_components_merge_key_by_key(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "DATA:\n  META:\n    COMPONENTS:\n      HABITAT: {SOURCE: habitat, DIM: 4, IDX: 3}\n"
        "      TEMPORAL: {COLUMNS: [month_sin, month_cos]}\n"
    )
    (tmp_path / "exp.yaml").write_text(
        "BASE: [base.yaml]\nDATA:\n  META:\n    COMPONENTS:\n      HABITAT: {DIM: 5}\n      SPATIAL: {ENABLED: False}\n"
    )
    cfg = load_config(tmp_path / "exp.yaml")
    comps = cfg.DATA.META.COMPONENTS
    assert list(comps) == ["TEMPORAL", "SPATIAL", "ELEVATION", "HABITAT"]
    assert comps["HABITAT"].DIM == 5 and comps["HABITAT"].SOURCE == "habitat"
    assert comps["TEMPORAL"].COLUMNS == ["month_sin", "month_cos"] and comps["TEMPORAL"].SOURCE == "temporal"
    assert comps["SPATIAL"].ENABLED is False and comps["SPATIAL"].DIM == 3
    # A partial spec from --opts is completed from that component's defaults, even replacing the whole entry.
    cfg = load_config(None, ["DATA.META.COMPONENTS.TEMPORAL.DIM", "4"])
    assert cfg.DATA.META.COMPONENTS["TEMPORAL"].DIM == 4 and cfg.DATA.META.COMPONENTS["SPATIAL"].ENABLED
    cfg = load_config(None, ["DATA.META.COMPONENTS.ELEVATION", "{ENABLED: True}"])
    assert cfg.DATA.META.COMPONENTS["ELEVATION"].SOURCE == "elevation_broadrange_2"


def _ramp_sections() -> list[str]:
    out = []

    def walk(model, prefix: str) -> None:
        for name, info in model.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, Ramp):
                out.append(f"{prefix}{name}")
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    walk(type(default_config()), "")
    return out


@pytest.mark.parametrize("section", _ramp_sections())
def test_a_partial_ramp_section_keeps_that_sections_defaults(section: str) -> None:
    default = default_config()
    node = default
    for part in section.split("."):
        node = getattr(node, part)
    flipped = not node.ENABLED
    cfg = load_config(None, [section, f"{{ENABLED: {flipped}}}"])
    got = cfg
    for part in section.split("."):
        got = getattr(got, part)
    assert got.model_dump() == {**node.model_dump(), "ENABLED": flipped}


def test_every_ramp_section_is_covered() -> None:
    assert {"SCHEDULE.META_MASKING", "SCHEDULE.NULL_MASKING", "SCHEDULE.MIX.PROB"} <= set(_ramp_sections())
    mix = load_config(None, ["SCHEDULE.MIX.PROB", "{ENABLED: True}"]).SCHEDULE.MIX.PROB
    assert (mix.START_PROB, mix.END_PROB) == (1.0, 0.2)


def test_yaml_alias_bombs_and_duplicate_keys_are_refused_in_one_line(tmp_path: Path) -> None:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        levels.append(f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [{', '.join(['*' + prev] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\n")
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_config(bomb)
    assert time.monotonic() - start < 5
    assert "aliases expand past" in str(err.value) and len(str(err.value)) < 300
    dup = tmp_path / "dup.yaml"
    dup.write_text("DATA:\n  BATCH_SIZE: 8\n  BATCH_SIZE: 16\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml line 3: duplicate key 'BATCH_SIZE'"):
        load_config(dup)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda d: d, "is a folder; expected a YAML file"),
        (lambda d: _write(d / "latin1.yaml", b"EXPERIMENT: {NAME: caf\xe9}\n"), "line 1: not UTF-8 text"),
        (
            lambda d: _write(d / "e.yaml", b"TRAIN: {EPOCHS: 1e400}\n"),
            "TRAIN.EPOCHS (from e.yaml): expected a finite number",
        ),
        (lambda d: _write(d / "s.yaml", b"MISC: {SEED: " + b"9" * 5000 + b"}\n"), "a value cannot be read"),
        (
            lambda d: _write(d / "s2.yaml", b"MISC: {SEED: " + b"9" * 40 + b"}\n"),
            "MISC.SEED (from s2.yaml): Input should be less",
        ),
    ],
)
def test_unreadable_config_inputs_fail_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, setup, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = setup(tmp_path)
    assert main(["config", "validate", "--cfg", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and len(err) < 400


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_opts_errors_name_opts_as_the_source() -> None:
    with pytest.raises(ConfigError, match=r"^train \(from --opts\): unknown key; did you mean TRAIN\?"):
        load_config(None, ["train.epochs", "2"])
    with pytest.raises(ConfigError, match=r"TRAIN.EPOCHS \(from --opts\): expected a finite number"):
        load_config(None, ["TRAIN.EPOCHS", "1e400"])


def test_validate_lists_every_problem_also_as_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("DATA: {BATCH_SIZ: 1, IMG_SIZE: 10}\nTRAIN: {EPOCHS: -1}\nOPTIMIZER: {NAME: sgd}\n")
    assert main(["config", "validate", "--cfg", str(bad), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and len(report["errors"]) == 4
    assert any("DATA.BATCH_SIZ" in e for e in report["errors"]) and any("OPTIMIZER.NAME" in e for e in report["errors"])
    with pytest.raises(ConfigError, match=r"\(\+3 more; `linnaeus config validate` lists all\)"):
        load_config(bad)
    # `linnaeus check --json` carries them all too.
    assert main(["check", "--cfg", str(bad), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and len(report["errors"]) == 4


def test_render_names_each_source_and_loads_back(polli_checkout: Path, capsys: pytest.CaptureFixture) -> None:
    exp = polli_checkout / "configs/experiments/generic_mformer_example.yaml"
    cfg, prov = load_config_with_provenance(exp)
    text = render_text(cfg, prov)
    assert "  DROP_PATH_RATE: 0.01  # from configs/experiments/generic_mformer_example.yaml" in text
    assert '  TYPE: "mFormerV1"  # from configs/experiments/generic_mformer_example.yaml' in text
    assert "    LAYER_SCALE_INIT_VALUE: 1e-06  # from configs/model/archs/mFormerV1/mFormerV1_sm.yaml" in text
    assert "  SEED: 42  # from defaults" in text
    out = polli_checkout / "rendered.yaml"
    out.write_text(text)
    assert load_config(out) == cfg
    assert main(["config", "render", "--cfg", str(exp), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["TRAIN.EPOCHS"] == {"value": 40.0, "source": "configs/experiments/generic_mformer_example.yaml"}


def test_explain_gives_meaning_default_and_source(polli_checkout: Path, capsys: pytest.CaptureFixture) -> None:
    exp = "configs/experiments/generic_mformer_example.yaml"
    assert main(["config", "explain", "DATA.BATCH_SIZE", "--cfg", exp]) == 0
    out = capsys.readouterr().out
    assert "per process" in out and "default: 64" in out and f"value: 96  (set in {exp})" in out
    assert main(["config", "explain", "MODEL.CONV_STAGES.STRIDE_SEQS"]) == 0
    assert "a Polli Linnaeus key; fixed here" in capsys.readouterr().out
    assert main(["config", "explain", "MODEL.CLASSIFICATION.HEADS.taxa_L10.LOSS.WEIGHT"]) == 0
    assert "default: 1.0" in capsys.readouterr().out
    assert main(["config", "explain", "DATA.BATCH_SIZ"]) == 2
    assert "did you mean DATA.BATCH_SIZE?" in capsys.readouterr().err


@pytest.mark.parametrize(
    "rel",
    [
        "configs/experiments/generic_mformer_example.yaml",
        "configs/experiments/example_experiment.yaml",
        "configs/model/archs/mFormerV0/mFormerV0_lg.yaml",
        "configs/model/archs/mFormerV1/mFormerV1_xl.yaml",
    ],
)
def test_migrate_output_loads_without_warnings_to_the_same_config(polli_checkout: Path, rel: str) -> None:
    src = polli_checkout / rel
    out = polli_checkout / "migrated.yaml"
    assert main(["config", "migrate", str(src), "--out", str(out)]) == 0
    before, before_prov = load_config_with_provenance(src)
    after, after_prov = load_config_with_provenance(out)
    assert after_prov.warnings == []
    assert after.model_copy(update={"BASE_RESOLVED": []}) == before.model_copy(update={"BASE_RESOLVED": []})
    text = out.read_text()
    hint = "; `linnaeus config migrate` rewrites it"
    assert all(f"# {w.replace(hint, '')}\n" in text for w in before_prov.warnings)  # one comment per change
    assert migrated_text(src) == text


def test_the_guide_snippet_takes_either_prior_arch_file_as_base(polli_checkout: Path) -> None:
    snippet = (repo_root() / "configs/experiments/my_custom_experiment.yaml").read_text()
    for name in ("mFormerV1_sm", "mFormerV0_sm"):
        exp = polli_checkout / f"configs/experiments/guide_{name}.yaml"
        exp.write_text(snippet.replace("mFormerV1/mFormerV1_sm.yaml", f"{name[:9]}/{name}.yaml"))
        cfg, prov = load_config_with_provenance(exp)
        assert cfg.MODEL.NAME == name
        assert cfg.BASE_RESOLVED == [str(arch_file(polli_checkout, name).resolve())]
        assert any("DATA.USE_VECTORIZED_PROCESSOR" in w for w in prov.warnings)


def test_config_dir_env_is_a_base_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(POLLI / "configs", tmp_path / "polli_configs" / "configs")
    exp = tmp_path / "elsewhere" / "exp.yaml"
    exp.parent.mkdir()
    exp.write_text("MODEL: {BASE: ['configs/model/archs/mFormerV0/mFormerV0_md.yaml']}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONFIG_DIR", str(tmp_path / "polli_configs"))
    assert load_config(exp).BASE_RESOLVED == [str(arch_file(tmp_path / "polli_configs", "mFormerV0_md").resolve())]
    monkeypatch.delenv("CONFIG_DIR")
    assert os.environ.get("CONFIG_DIR") is None


def test_no_section_default_differs_from_its_class_except_interval_alternatives() -> None:
    """A partial YAML section is built from its class's defaults, so a section whose default instance differs from
    them would silently change (the MIX.PROB bug). Intervals differ on purpose: STEPS/EPOCHS/FRACTION are
    alternatives, so setting one must not keep the default EPOCHS."""
    from pydantic import BaseModel

    from linnaeus.config.defaults import Interval

    differing = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                if ann is not Interval and info.get_default(call_default_factory=True) != ann():
                    differing.append(prefix + name)
                walk(ann, f"{prefix}{name}.")

    walk(type(default_config()), "")
    assert differing == []
    cfg = load_config(None, ["SCHEDULE.VALIDATION.INTERVAL", "{STEPS: 100}"])
    assert (cfg.SCHEDULE.VALIDATION.INTERVAL.STEPS, cfg.SCHEDULE.VALIDATION.INTERVAL.EPOCHS) == (100, None)
