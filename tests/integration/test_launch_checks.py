"""Launch sanity before anything is built: one line from the first process, quiet exits elsewhere; the shipped
DeepSpeed configs found from any working directory."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from linnaeus.engine.launch_checks import DS_CONFIG_ENV, check_launch, launch_problem, resolve_deepspeed_config
from linnaeus.errors import ConfigError

from launch_utils import ACCELERATE, DEMO_CFG, ROOT, ensure_demo, env, run_dir, tiny_opts


def test_more_processes_than_cpu_cores_without_gpu_is_one_error_on_the_first_process() -> None:
    environ = {"LOCAL_WORLD_SIZE": "8", "LOCAL_RANK": "0", "ACCELERATE_USE_DEEPSPEED": "true"}
    with pytest.raises(ConfigError, match=r"started 8 processes on this machine, which has no usable GPU and 2 CPU"):
        check_launch(environ, cuda_devices=0, cpu_count=2)
    with pytest.raises(SystemExit) as exit_info:
        check_launch({**environ, "LOCAL_RANK": "3"}, cuda_devices=0, cpu_count=2)
    assert exit_info.value.code == 0  # the launcher fails the job on the first process's code


def test_more_processes_than_gpus() -> None:
    msg = launch_problem({"LOCAL_WORLD_SIZE": "8", "CUDA_VISIBLE_DEVICES": "0,1"}, cuda_devices=2, cpu_count=64)
    assert msg is not None and "only 2 GPUs are visible (CUDA_VISIBLE_DEVICES=0,1)" in msg
    assert launch_problem({"LOCAL_WORLD_SIZE": "2"}, cuda_devices=2, cpu_count=1) is None
    assert launch_problem({"LOCAL_WORLD_SIZE": "2"}, cuda_devices=0, cpu_count=2) is None
    assert launch_problem({}, cuda_devices=0, cpu_count=1) is None
    # A CPU config on a GPU machine is limited by cores, not GPUs.
    assert launch_problem({"LOCAL_WORLD_SIZE": "4", "ACCELERATE_USE_CPU": "true"}, cuda_devices=1, cpu_count=8) is None


def test_relative_deepspeed_json_is_found_from_another_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    environ = {"ACCELERATE_USE_DEEPSPEED": "true", DS_CONFIG_ENV: "accelerate_configs/ds_cpu_zero2.json"}
    found = resolve_deepspeed_config(environ)
    assert found == (ROOT / "accelerate_configs" / "ds_cpu_zero2.json").resolve()
    assert environ[DS_CONFIG_ENV] == str(found)
    environ = {"ACCELERATE_USE_DEEPSPEED": "true", DS_CONFIG_ENV: "nowhere/ds.json"}
    with pytest.raises(ConfigError, match=r"deepspeed_config_file: nowhere/ds.json not found in the working directory"):
        resolve_deepspeed_config(environ)
    assert resolve_deepspeed_config({DS_CONFIG_ENV: "nowhere/ds.json"}) is None  # not a DeepSpeed launch


def _gpu_launch(launcher: str, out: Path) -> list[str]:
    """The demo under the 8-GPU ZeRO-2 accelerate config, launched by ``launcher`` (accelerate or linnaeus)."""
    config = str(ROOT / "accelerate_configs/zero2.yaml")
    opts = ["EXPERIMENT.OUTPUT_DIR", str(out)]
    return [
        launcher,
        "launch",
        "--config_file",
        config,
        "-m",
        "linnaeus.train",
        "--cfg",
        str(DEMO_CFG),
        "--opts",
        *opts,
    ]


@pytest.mark.slow
def test_gpu_config_on_a_cpu_machine_prints_one_line(tmp_path: Path) -> None:
    cmd = _gpu_launch(ACCELERATE, tmp_path)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "started 8 processes on this machine, which has no usable GPU" in errors[0]
    assert "building DeepSpeed" not in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written before the launch is known to work"
    assert time.monotonic() - start < 240


@pytest.mark.slow
def test_shipped_deepspeed_config_works_from_another_folder(tmp_path: Path) -> None:
    demo = ensure_demo(tmp_path.parent, per_species=8)
    elsewhere = tmp_path / "my_project"
    elsewhere.mkdir()
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(ROOT / "accelerate_configs/cpu_zero2.yaml"),
        "-m",
        "linnaeus.train",
        "--cfg",
        str(DEMO_CFG),
        "--opts",
        *tiny_opts(demo, tmp_path / "out", TRAIN__MAX_STEPS=2),
    ]
    proc = subprocess.run(cmd, cwd=elsewhere, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "JSONDecodeError" not in proc.stderr
    run = run_dir(tmp_path / "out")
    assert (run / "export" / "final.safetensors").is_file()
    assert re.search(r"ZeRO stage\s+2\b", (run / "logs" / "train.log").read_text())


def test_a_gpu_config_without_a_usable_gpu_is_refused_unless_cpu_is_meant(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text('{"bf16": {"enabled": true}}')
    asked = [
        {"ACCELERATE_USE_CPU": "False", "CUDA_VISIBLE_DEVICES": "0", "ACCELERATE_MIXED_PRECISION": "no"},
        {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "bf16"},
        {"ACCELERATE_USE_DEEPSPEED": "true", DS_CONFIG_ENV: str(ds), "LOCAL_WORLD_SIZE": "2"},
    ]
    for environ in asked:
        msg = launch_problem(environ, cuda_devices=0, cpu_count=4)
        assert msg is not None and "has no usable GPU" in msg and "LINNAEUS_ALLOW_CPU=1" in msg, environ
        assert launch_problem({**environ, "LINNAEUS_ALLOW_CPU": "1"}, cuda_devices=0, cpu_count=4) is None
        assert launch_problem({**environ, "ACCELERATE_USE_CPU": "true"}, cuda_devices=0, cpu_count=4) is None
        assert launch_problem(environ, cuda_devices=2, cpu_count=4) is None
    # the shipped CPU configs (and a plain `python -m linnaeus.train`) ask for nothing a CPU lacks
    cpu_ds = {"ACCELERATE_USE_DEEPSPEED": "true", "LOCAL_WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "no"}
    cpu_ds[DS_CONFIG_ENV] = str(ROOT / "accelerate_configs" / "ds_cpu_zero2.json")
    assert launch_problem(cpu_ds, cuda_devices=0, cpu_count=4) is None
    assert launch_problem({"CUDA_VISIBLE_DEVICES": "0"}, cuda_devices=0, cpu_count=4) is None


@pytest.mark.slow
def test_single_gpu_config_on_a_cpu_machine_is_one_line_and_no_run_folder(tmp_path: Path) -> None:
    demo = ensure_demo(tmp_path, per_species=4)
    out = tmp_path / "out"
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(ROOT / "accelerate_configs/single_gpu.yaml"),
        "-m",
        "linnaeus.train",
        "--cfg",
        str(DEMO_CFG),
        "--opts",
        *tiny_opts(demo, out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "asks for a GPU (gpu_ids 0) but this machine has no usable GPU" in errors[0]
    assert not out.exists()


@pytest.mark.slow
def test_linnaeus_launch_refuses_a_gpu_config_before_spawning_with_only_our_line(tmp_path: Path) -> None:
    cmd = _gpu_launch(str(Path(ACCELERATE).with_name("linnaeus")), tmp_path)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: accelerate launch started 8 processes on this machine, which has no usable GPU")
    assert proc.stdout.strip() == ""
    assert not any(tmp_path.iterdir())
    assert time.monotonic() - start < 60  # nothing was spawned


def test_the_run_summary_names_the_device() -> None:
    import torch

    from linnaeus.engine.distributed import device_summary

    assert device_summary(torch.device("cpu"), 1) == "cpu, no CUDA"  # this machine has no GPU
    assert device_summary(torch.device("cpu"), 2) == "cpu x2, no CUDA"


def test_the_deepspeed_op_build_or_the_wait_for_one_is_announced_with_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    import torch.utils.cpp_extension as extension

    from linnaeus.engine.launch_checks import DS_CPU_COMM_OP, deepspeed_op_notice

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    environ = {"ACCELERATE_USE_DEEPSPEED": "true", "LOCAL_WORLD_SIZE": "2"}
    folder = tmp_path / DS_CPU_COMM_OP
    assert deepspeed_op_notice(environ, cuda_available=False) == (
        f"linnaeus: building DeepSpeed's CPU communication op (~3 min) in {folder}"
    )
    folder.mkdir()
    (folder / f"{DS_CPU_COMM_OP}.so").write_bytes(b"\0")
    (folder / "build.ninja").write_text("cflags = -isystem /elsewhere/venv/site-packages/torch/include\n")
    assert "(the cached build is another environment's)" in str(deepspeed_op_notice(environ, cuda_available=False))
    (folder / "lock").touch()
    if hasattr(extension, "FileLock"):  # recent torch: an advisory lock; the file alone is no build in progress
        assert "(the cached build is another environment's)" in str(deepspeed_op_notice(environ, cuda_available=False))
    # another process building there now holds the lock
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(folder / "lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        notice = deepspeed_op_notice(environ, cuda_available=False)
        assert (
            notice is not None
            and notice.startswith("linnaeus: waiting for another process's build")
            and str(folder) in notice
        )
    finally:
        holder.kill()
        holder.wait()
    (folder / "lock").unlink()
    ours = Path(torch.__file__).parent / "include"
    (folder / "build.ninja").write_text(f"cflags = -isystem {ours} -isystem {ours}/torch/csrc/api/include\n")
    assert deepspeed_op_notice(environ, cuda_available=False) is None  # a build for this torch: it just loads
    # the same torch through another path (a linked environment) makes ninja rebuild: announced
    (folder / "build.ninja").write_text(f"cflags = -isystem {tmp_path / 'link'}/torch/include\n")
    (tmp_path / "link").symlink_to(Path(torch.__file__).parent.parent)
    assert "another environment's" in str(deepspeed_op_notice(environ, cuda_available=False))
    assert deepspeed_op_notice({**environ, "LOCAL_WORLD_SIZE": "1"}, cuda_available=False) is None
