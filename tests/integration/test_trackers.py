"""Trackers through accelerate (TensorBoard event files, CSV) and the W&B pre-flight: one line, never a prompt."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from linnaeus.config import load_config
from linnaeus.config.resolve_engine import engine_spec
from linnaeus.engine.trackers import plan_trackers, tracker_names, wandb_preflight
from linnaeus.errors import ConfigError

from launch_utils import DEMO_CFG, ROOT, ensure_demo, env, tiny_opts


def _cfg(*opts: str):
    """The demo config's tracking spec, with ``opts``."""
    return engine_spec(load_config(DEMO_CFG, list(opts))).tracking


def test_tracker_names_merge_the_wandb_switch_and_reject_unknown_names() -> None:
    assert tracker_names(_cfg()) == []
    assert tracker_names(_cfg("EXPERIMENT.TRACKERS", "[tensorboard, csv]", "EXPERIMENT.WANDB.ENABLED", "true")) == [
        "tensorboard",
        "csv",
        "wandb",
    ]
    with pytest.raises(ConfigError, match=r"EXPERIMENT.TRACKERS: unknown tracker 'tensorbord'"):
        tracker_names(_cfg("EXPERIMENT.TRACKERS", "[tensorbord]"))


def test_tensorboard_and_csv_write_files_through_a_real_accelerator(tmp_path: Path) -> None:
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg("EXPERIMENT.TRACKERS", "[tensorboard, csv]")
    plan = plan_trackers(cfg, tmp_path)
    acc = Accelerator(cpu=True, **plan.accelerator_kwargs())
    acc.init_trackers(**plan.init_kwargs({"DATA": {"BATCH_SIZE": 8, "MEAN": [0.5, 0.5]}, "NAME": None}))
    for step in (1, 2, 3):
        acc.log({"train/loss": 4.0 - step, "train/lr": 0.1}, step=step)
    acc.end_training()
    events = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    scalars = EventAccumulator(str(events[0].parent)).Reload().Scalars("train/loss")
    assert [(s.step, s.value) for s in scalars] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    rows = (tmp_path / "tracker_metrics.csv").read_text().splitlines()
    assert rows[0] == "step,key,value" and "3,train/loss,1.0" in rows


def test_wandb_preflight_without_credentials(tmp_path: Path) -> None:
    on = _cfg("EXPERIMENT.WANDB.ENABLED", "true")
    clean = {"HOME": str(tmp_path)}
    with pytest.raises(ConfigError) as err:
        wandb_preflight(on, clean, tmp_path)
    text = str(err.value)
    assert "\n" not in text and "WANDB_MODE=offline" in text and "EXPERIMENT.WANDB.ENABLED False" in text
    wandb_preflight(on, {**clean, "WANDB_MODE": "offline"}, tmp_path)
    wandb_preflight(on, {**clean, "WANDB_API_KEY": "x" * 40}, tmp_path)
    wandb_preflight(_cfg("EXPERIMENT.WANDB.ENABLED", "true", "EXPERIMENT.WANDB.MODE", "disabled"), clean, tmp_path)
    wandb_preflight(_cfg(), clean, tmp_path)  # W&B off: nothing to check
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    wandb_preflight(on, clean, tmp_path)
    with pytest.raises(ConfigError, match=r"no ~/\.netrc entry for wandb\.example\.org"):
        wandb_preflight(on, {**clean, "WANDB_BASE_URL": "https://wandb.example.org"}, tmp_path)
    (tmp_path / ".netrc").unlink()
    (tmp_path / ".config" / "wandb").mkdir(parents=True)
    (tmp_path / ".config" / "wandb" / "settings").write_text("[default]\nmode = offline\n")
    wandb_preflight(on, clean, tmp_path)  # `wandb offline` was run on this machine


def _no_credentials_env(home: Path) -> dict[str, str]:
    e = env()
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED", "NETRC", "WANDB_CONFIG_DIR"):
        e.pop(k, None)
    e["HOME"] = str(home)
    return e


@pytest.fixture(scope="module")
def wandb_cmd(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    demo = ensure_demo(tmp_path_factory.getbasetemp(), per_species=8)
    out = tmp_path_factory.mktemp("wandb_out")
    opts = tiny_opts(demo, out, EXPERIMENT__WANDB__ENABLED=True)
    return [sys.executable, "-m", "linnaeus.train", "--cfg", str(DEMO_CFG), "--opts", *opts]


def test_wandb_without_credentials_exits_with_one_line_without_a_terminal(wandb_cmd, tmp_path: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        wandb_cmd,
        cwd=ROOT,
        env=_no_credentials_env(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - start < 60
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: EXPERIMENT.WANDB.ENABLED: W&B is on but this machine has no W&B credentials")


def test_wandb_without_credentials_never_prompts_on_a_terminal(wandb_cmd, tmp_path: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # child: stdin, stdout and stderr are the pseudo-terminal
        os.chdir(ROOT)
        os.execve(wandb_cmd[0], wandb_cmd, _no_credentials_env(tmp_path))
    start, out = time.monotonic(), b""
    while time.monotonic() - start < 60:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    else:
        os.kill(pid, 9)
        pytest.fail(f"still running after 60 s (a prompt?): {out[-2000:]!r}")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 2
    lines = [line for line in out.decode(errors="replace").splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: EXPERIMENT.WANDB.ENABLED"), lines
    assert b"Enter your choice" not in out
