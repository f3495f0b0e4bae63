"""One run per run folder: a lock with host, pid and heartbeat; busy folders refused, stale locks taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from linnaeus.engine.run_dir import RunLock
from linnaeus.errors import ConfigError

from launch_utils import ensure_demo, env, launch, metrics, run_dir, spawn, tiny_opts

HOLD = "import sys, time; from linnaeus.engine.run_dir import RunLock; RunLock.acquire(sys.argv[1]); {after}"


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_lock(path: Path, proc: subprocess.Popen) -> dict:
    deadline = time.time() + 60
    while not path.is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    return json.loads(path.read_text())


def test_lock_held_by_a_live_process_refuses_and_is_released_at_its_exit(tmp_path: Path) -> None:
    holder = _python(HOLD.format(after="print('held', flush=True); time.sleep(600)"), str(tmp_path))
    assert holder.stdout.readline().strip() == "held"
    record = _wait_for_lock(tmp_path / "run.lock", holder)
    assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
    with pytest.raises(ConfigError, match=rf"in use by pid {holder.pid} on {socket.gethostname()}"):
        RunLock.acquire(tmp_path)
    holder.send_signal(signal.SIGINT)  # KeyboardInterrupt: a normal interpreter exit runs the release
    holder.communicate(timeout=30)
    assert not (tmp_path / "run.lock").exists()
    RunLock.acquire(tmp_path).release()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path: Path, caplog) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid, "heartbeat": 0}))
    with caplog.at_level(logging.WARNING, logger="linnaeus"):
        lock = RunLock.acquire(tmp_path)
    assert f"pid {dead_pid} on this host no longer exists" in caplog.text
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_other_host_lock_is_stale_only_when_its_heartbeat_is_old(tmp_path: Path, caplog) -> None:
    fresh = {"host": "node-elsewhere", "pid": 4242, "heartbeat": time.time() - 5}
    (tmp_path / "run.lock").write_text(json.dumps(fresh))
    with pytest.raises(ConfigError, match="in use by pid 4242 on node-elsewhere"):
        RunLock.acquire(tmp_path)
    old = dict(fresh, heartbeat=time.time() - RunLock.STALE_AFTER_S - 60)
    (tmp_path / "run.lock").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="linnaeus"):
        RunLock.acquire(tmp_path).release()
    assert "node-elsewhere has not refreshed its heartbeat" in caplog.text


def test_heartbeat_is_refreshed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(RunLock, "HEARTBEAT_S", 0.05)
    (tmp_path / ".config.yaml.x1y2.tmp").write_text("left by a kill during an atomic write")
    lock = RunLock.acquire(tmp_path)
    assert not (tmp_path / ".config.yaml.x1y2.tmp").exists()
    first = json.loads((tmp_path / "run.lock").read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / "run.lock").read_text())["heartbeat"] > first
    lock.release()
    assert not (tmp_path / "run.lock").exists()
    assert not list(tmp_path.glob(".run.lock.*"))


@pytest.mark.slow
def test_second_training_run_into_a_busy_folder_is_refused(tmp_path_factory, tmp_path: Path) -> None:
    demo = ensure_demo(tmp_path_factory.getbasetemp(), per_species=30)
    opts = tiny_opts(demo, tmp_path, name="busy", TRAIN__MAX_STEPS=400)
    run = run_dir(tmp_path, "busy")
    first = spawn(opts)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").is_file() and metrics(run, "train")):
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    second = launch(opts, check=False)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert second.returncode == 2
    errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"in use by pid {first.pid}" in errors[0], second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    assert first.returncode == 75
    assert not (run / "run.lock").exists()  # released by the first run at its exit


def _plant(run: Path, **record: object) -> None:
    (run / "run.lock").write_text(json.dumps(record))


def test_lock_of_the_same_slurm_job_on_another_host_is_taken_over_at_once(tmp_path: Path, monkeypatch, caplog) -> None:
    """A requeued job restarts on another node while its hard-killed predecessor's heartbeat is still fresh."""
    _plant(tmp_path, host="gpu-node-017", pid=4242, heartbeat=time.time() - 53, job="777")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    with caplog.at_level(logging.WARNING, logger="linnaeus"):
        lock = RunLock.acquire(tmp_path)
    assert "SLURM job 777" in caplog.text and "gpu-node-017" in caplog.text
    record = json.loads((tmp_path / "run.lock").read_text())
    assert record["job"] == "777" and record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    lock.release()


def test_lock_of_another_slurm_job_is_refused(tmp_path: Path, monkeypatch) -> None:
    _plant(tmp_path, host="gpu-node-017", pid=4242, heartbeat=time.time() - 53, job="777")
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(ConfigError, match=r"in use by pid 4242 on gpu-node-017.*SLURM job 777"):
        RunLock.acquire(tmp_path)
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(ConfigError, match=r"in use by pid 4242 on gpu-node-017"):
        RunLock.acquire(tmp_path)


def test_reused_pid_on_this_host_does_not_block_forever(tmp_path: Path, caplog) -> None:
    """The pid in the lock now belongs to an unrelated live process (here: our parent)."""
    reused = os.getppid()
    # An old heartbeat: stale whatever the pid is doing now.
    _plant(tmp_path, host=socket.gethostname(), pid=reused, heartbeat=time.time() - RunLock.STALE_AFTER_S - 60)
    with caplog.at_level(logging.WARNING, logger="linnaeus"):
        RunLock.acquire(tmp_path).release()
    assert f"pid {reused} on this host has not refreshed its heartbeat" in caplog.text
    # A fresh heartbeat but another process start time: that pid was reused, taken over at once.
    caplog.clear()
    _plant(tmp_path, host=socket.gethostname(), pid=reused, pid_start=1, heartbeat=time.time())
    with caplog.at_level(logging.WARNING, logger="linnaeus"):
        RunLock.acquire(tmp_path).release()
    assert f"pid {reused} on this host now belongs to another process" in caplog.text


def test_refusal_names_every_rank(tmp_path: Path) -> None:
    code = (
        "import sys, time; from linnaeus.engine.run_dir import RunLock; "
        "RunLock.acquire(sys.argv[1], ranks=[('node-a', 101), ('node-b', 202)]); print('held', flush=True); "
        "time.sleep(600)"
    )
    holder = _python(code, str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        with pytest.raises(ConfigError) as err:
            RunLock.acquire(tmp_path)
        text = str(err.value)
        assert f"in use by pid {holder.pid} on {socket.gethostname()}" in text
        assert "rank 0: pid 101 on node-a" in text and "rank 1: pid 202 on node-b" in text, text
    finally:
        holder.send_signal(signal.SIGINT)
        holder.communicate(timeout=30)
