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
