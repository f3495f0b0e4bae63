"""Every accelerate config parses with accelerate's own loader, points at a DeepSpeed JSON that exists, and keeps
one source of truth: no optimizer/scheduler blocks, "auto" only where Linnaeus fills the value, precision in one place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from linnaeus.config import repo_root

ROOT = repo_root()
CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
EXPECTED = {
    "single_gpu",
    "multi_gpu_ddp",
    "zero1",
    "zero2",
    "zero3",
    "multi_node_zero2",
    "cpu_ddp",
    "cpu_zero2",
    "cpu_zero3",
}
FILLED_BY_LINNAEUS = {
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "train_batch_size",
}


def test_exactly_the_documented_configs_exist() -> None:
    assert {p.stem for p in CONFIGS} == EXPECTED


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_is_consistent(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    if path.stem.startswith("cpu_"):
        assert raw["num_processes"] == 2 and raw["num_machines"] == 1
    if raw["distributed_type"] == "DEEPSPEED":
        ds_path = ROOT / raw["deepspeed_config"]["deepspeed_config_file"]
        assert ds_path.is_file()
        ds = json.loads(ds_path.read_text())
        assert "optimizer" not in ds and "scheduler" not in ds
        # accelerate refuses a YAML precision next to a DeepSpeed JSON: precision lives in the JSON only.
        assert "mixed_precision" not in raw
        autos = {k for k, v in ds.items() if v == "auto"}
        assert autos <= FILLED_BY_LINNAEUS
        for section in ("zero_optimization",):
            assert all(v != "auto" for v in ds[section].values()), "bucket sizes must be integers for a non-HF model"
        stage = ds["zero_optimization"]["stage"]
        if path.stem.startswith("zero"):
            assert stage == int(path.stem[-1])
            assert ds["bf16"]["enabled"] is True
        assert cfg.deepspeed_config["zero3_init_flag"] is False
    else:
        assert cfg.mixed_precision in ("no", "bf16")
