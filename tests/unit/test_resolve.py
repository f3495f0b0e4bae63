"""The config is read once into specs; every cross-key rule (the launch's included) is listed before any file is read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from linnaeus.config import load_config, repo_root
from linnaeus.config.launch_facts import LaunchFacts, from_accelerate_config, from_environment
from linnaeus.config.resolve import batch_fill_problem, cross_key_problems, resolve
from linnaeus.errors import ConfigError
from linnaeus.specs import RunSpec

ROOT = repo_root()
DEMO = ROOT / "configs/experiments/demo.yaml"

# Each conflict used to be raised deep inside training's setup, one at a time, minutes into a cluster job.
CONFLICTS = """\
BASE: [{demo}]
DATA:
  H5: {{LABELS_PATH: /nowhere/labels.h5}}
  HYBRID: {{IMAGES_DIR: /nowhere/images}}
SCHEDULE:
  CHECKPOINT: {{BEST_METRIC: val_ema/chain_accuracy}}
MODEL:
  UNFREEZE_BACKBONE_AFTER: {{STEPS: 10}}
LOSS:
  GRADNORM: {{ENABLED: true}}
TRAIN:
  NONFINITE: skip
"""
EXPECTED = [
    "SCHEDULE.CHECKPOINT.BEST_METRIC",
    "MODEL.UNFREEZE_BACKBONE_AFTER",
    "LOSS.GRADNORM.ENABLED",
    "TRAIN.NONFINITE",
]


def test_validate_lists_every_cross_key_conflict_in_one_call_with_no_data(tmp_path: Path) -> None:
    cfg = tmp_path / "conflicts.yaml"
    cfg.write_text(CONFLICTS.format(demo=DEMO))
    cmd = [sys.executable, "-m", "linnaeus", "config", "validate", "--cfg", str(cfg)]
    launch = ["--accelerate-config", str(ROOT / "accelerate_configs/zero3.yaml")]
    out = subprocess.run([*cmd, *launch], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert [e.split(" ")[1] for e in errors] == EXPECTED, out.stderr
    assert "config: 4 problems" in out.stdout
    assert all("conflicts.yaml" in e for e in errors)  # each line names the file the key came from
    # Without the launch, the launch-independent rules still stop the same config.
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert [e.split(" ")[1] for e in out.stderr.splitlines() if e.startswith("error: ")] == EXPECTED[:2]


def test_training_refuses_the_same_config_when_it_loads(tmp_path: Path) -> None:
    cfg = tmp_path / "conflicts.yaml"
    cfg.write_text(CONFLICTS.format(demo=DEMO))
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert err.value.problems[0].startswith("SCHEDULE.CHECKPOINT.BEST_METRIC")  # type: ignore[attr-defined]
    assert "(+1 more; `linnaeus config validate` lists all)" in str(err.value)


def test_launch_rules_follow_the_launch_not_the_config() -> None:
    cfg = load_config(DEMO, ["LOSS.GRADNORM.ENABLED", "true", "TRAIN.NONFINITE", "skip"])
    assert cross_key_problems(cfg) == []
    zero2 = LaunchFacts(source="test", deepspeed=True, zero_stage=2, precision="bf16")
    both = ["LOSS.GRADNORM.ENABLED", "TRAIN.NONFINITE"]
    assert [p.split(" ")[0] for p in cross_key_problems(cfg, launch=zero2)] == both
    fp16 = LaunchFacts(source="test", deepspeed=True, zero_stage=3, precision="fp16")
    assert [p.split(" ")[0] for p in cross_key_problems(cfg, launch=fp16)] == ["LOSS.GRADNORM.ENABLED"]
    # GradNorm's autograd.grad under DeepSpeed ZeRO-2 failed inside the engine (IndexError in reduce_ipg_grads);
    # it is refused before anything is built, with DDP named instead.
    (line,) = [p for p in cross_key_problems(cfg, launch=zero2) if p.startswith("LOSS.GRADNORM")]
    assert "DDP" in line and "cpu_ddp.yaml" in line
    ddp = LaunchFacts(source="test", processes=8)
    assert cross_key_problems(cfg, launch=ddp) == []


@pytest.mark.parametrize(
    ("name", "deepspeed", "stage", "precision", "processes"),
    [
        ("cpu_ddp", False, 0, None, 2),
        ("cpu_zero2", True, 2, None, 2),
        ("zero3", True, 3, "bf16", 8),
        ("multi_node_zero2", True, 2, "bf16", None),
    ],
)
def test_launch_facts_of_the_shipped_accelerate_configs(name, deepspeed, stage, precision, processes) -> None:
    facts = from_accelerate_config(ROOT / "accelerate_configs" / f"{name}.yaml")
    assert (facts.deepspeed, facts.zero_stage, facts.precision) == (deepspeed, stage, precision)
    if processes is not None:
        assert facts.processes == processes


def test_launch_facts_inside_a_launched_process(tmp_path: Path) -> None:
    ds = ROOT / "accelerate_configs/ds_zero3.json"
    env = {"WORLD_SIZE": "4", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}
    assert from_environment(env) == LaunchFacts("the DeepSpeed launch", True, 3, "bf16", 4)
    assert from_environment({}) == LaunchFacts("the launch")
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: DEEPSPEED\ndeepspeed_config: {deepspeed_config_file: nowhere.json}\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: cannot read the DeepSpeed config nowhere\.json"):
        from_accelerate_config(broken)


def test_resolve_returns_the_run_specs() -> None:
    spec, problems = resolve(load_config(DEMO))
    assert isinstance(spec, RunSpec) and problems == []


def test_batch_fill_rule() -> None:
    assert batch_fill_problem(32, 16, 2) is None
    assert batch_fill_problem(31, 16, 2) == (
        "DATA.BATCH_SIZE: 31 training samples cannot fill one batch of 16 on each of 2 processes"
    )
