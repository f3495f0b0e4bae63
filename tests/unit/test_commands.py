"""Every `linnaeus` command resolves to a handler in linnaeus/commands (no command may silently be missing)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from linnaeus.cli import HANDLERS, _resolve, build_parser


def test_every_parser_command_has_a_handler_and_every_handler_imports():
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    assert commands == set(HANDLERS)
    for command, target in HANDLERS.items():
        assert callable(_resolve(target)), command


@pytest.mark.parametrize("command", ["train", "bench", "demo-data", "predict", "export"])
def test_handlers_live_in_the_commands_package(command):
    assert HANDLERS[command].startswith("linnaeus.commands.")


def test_python_m_linnaeus_train_reports_a_config_error_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "linnaeus.train", "--cfg", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.yaml" in lines[0]


def test_linnaeus_env_names_versions_devices_ops_and_trackers():
    """What a bug report needs, from a real process: versions, this machine's devices, DeepSpeed ops, trackers."""
    import json

    import torch

    proc = subprocess.run(
        [sys.executable, "-m", "linnaeus", "env", "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip() == ""  # pasteable: nothing but the report
    report = json.loads(proc.stdout)
    assert report["torch"] == torch.__version__.split("+")[0] or report["torch"] == torch.__version__
    for key in ("accelerate", "deepspeed", "timm", "NCCL", "torch CUDA / cuDNN", "DeepSpeed ops", "trackers"):
        assert report[key], key
    if not torch.cuda.is_available():
        assert report["devices"] == "cpu, no CUDA"
    assert report["DeepSpeed ops"].startswith("prebuilt: ") and "JIT-built in " in report["DeepSpeed ops"]
    assert "tensorboard" in report["trackers"].split("; missing:")[0]  # the dev extra installs it
