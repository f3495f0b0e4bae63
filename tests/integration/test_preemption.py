"""Preemption the way SLURM delivers it: SIGTERM to every process, DataLoader workers included, through a real
2-process ZeRO-2 launch; the launcher's exit status is 75 and the checkpoint resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch_utils import (
    PY,
    ROOT,
    descendants,
    env,
    final_weights,
    free_port,
    metrics,
    run_dir,
    running,
    signal_tree,
    spawn_cmd,
    tiny_opts,
    train_cmd,
    wait_for,
)

pytestmark = pytest.mark.slow


def _linnaeus_launch(opts: list[str], accelerate_config: str) -> list[str]:
    cmd = train_cmd(opts, accelerate_config, extra=["--main_process_port", str(free_port())])
    assert cmd[1] == "launch"
    return [PY, "-m", "linnaeus.launch", *cmd[2:]]


def _run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def _train_rows(run: Path) -> int:
    return len(metrics(run, "train")) if (run / "metrics.jsonl").is_file() else 0


def _latest_step(run: Path) -> int | None:
    p = run / "checkpoints" / "latest"
    return int(p.read_text().strip().split("_")[1]) if p.is_file() else None


STEPS = 40
COMMON = dict(TRAIN__MAX_STEPS=STEPS, DATA__NUM_WORKERS=1, SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 1000}")


@pytest.fixture(scope="module")
def straight(demo: Path, tmp_path_factory) -> dict:
    """The same job run without interruption."""
    out = tmp_path_factory.mktemp("straight")
    proc = _run(_linnaeus_launch(tiny_opts(demo, out, name="straight", **COMMON), "cpu_zero2"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return final_weights(run_dir(out, "straight"))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return out


@pytest.mark.parametrize("target", ["group", "everything", "ranks", "hangup"])
def test_sigterm_with_workers_exits_75_from_the_launcher_and_resumes_exactly(
    demo: Path, tmp_path: Path, straight: dict, target: str
) -> None:
    steps, common = STEPS, COMMON
    run = run_dir(tmp_path, "pre")
    proc = spawn_cmd(_linnaeus_launch(tiny_opts(demo, tmp_path, name="pre", **common), "cpu_zero2"))
    wait_for(lambda: _train_rows(run) >= 3, proc, timeout=600)
    if target == "group":
        # What a person's Ctrl-C or `kill -TERM -PGID` reaches: the launcher (ranks run in their own sessions).
        os.killpg(proc.pid, signal.SIGTERM)
    elif target == "hangup":
        # A dropped ssh session or a closed terminal: SIGHUP to the launcher's process group.
        os.killpg(proc.pid, signal.SIGHUP)
    elif target == "ranks":
        ranks = [c for c in _children(proc.pid) if b"linnaeus.train" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(ranks) == 2
        for pid in ranks:
            os.kill(pid, signal.SIGTERM)
    else:
        # What SLURM does: every process of the job, the ranks' DataLoader workers included.
        workers = descendants(proc.pid)
        assert len(workers) >= 4, "expected launcher children: 2 ranks and their DataLoader workers"
        for pid in [proc.pid, *workers]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-4000:]
    assert "preempted and checkpointed; exit 75" in err
    assert "killed by signal" not in err
    stopped = _latest_step(run)
    assert stopped is not None and stopped < steps
    # `latest` is the step where training stopped: no step ran after the one saved.
    assert metrics(run, "train")[-1]["step"] == stopped

    resumed = _run(_linnaeus_launch(tiny_opts(demo, tmp_path, name="pre", **common), "cpu_zero2"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from step {stopped}" in (run / "logs" / "train.log").read_text()

    a, b = final_weights(run), straight
    worst = max(float((a[k] - b[k]).abs().max()) for k in b)
    assert worst < 1e-5, worst


def test_single_process_train_with_workers_exits_75(demo: Path, tmp_path: Path) -> None:
    opts = tiny_opts(demo, tmp_path, name="one", TRAIN__MAX_STEPS=400, DATA__NUM_WORKERS=1)
    run = run_dir(tmp_path, "one")
    proc = spawn_cmd([PY, "-m", "linnaeus", "train", *train_cmd(opts)[3:]])
    wait_for(lambda: _train_rows(run) >= 2, proc, timeout=300)
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its DataLoader worker
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-4000:]
    assert _latest_step(run) == metrics(run, "train")[-1]["step"]


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids of ``pids`` still running after ``seconds`` (zombies count as gone: nobody may reap orphans here)."""
    deadline = time.time() + seconds
    while True:
        left = [p for p in pids if running(p)]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.2)


def _describe(pids: list[int]) -> list[str]:
    out = []
    for p in pids:
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes().replace(bytes(1), b" ")[:200]
            out.append(f"{p}: {cmdline!r}")
        except OSError:
            out.append(f"{p}: ?")
    return out


def test_sigkill_of_a_training_process_ends_its_loader_processes(demo: Path, tmp_path: Path) -> None:
    """The OOM killer's choice: the loader's forkserver, its workers and the resource tracker must not live on."""
    opts = tiny_opts(demo, tmp_path, name="oom", TRAIN__MAX_STEPS=4000, DATA__NUM_WORKERS=1)
    run = run_dir(tmp_path, "oom")
    proc = spawn_cmd([PY, "-m", "linnaeus.train", *train_cmd(opts)[3:]])
    try:
        wait_for(lambda: _train_rows(run) >= 2, proc, timeout=300)
        loader = descendants(proc.pid)
        assert len(loader) >= 3, _describe(loader)  # forkserver, resource tracker, worker(s)
    finally:
        proc.kill()
    proc.wait(timeout=60)
    left = _gone_within(loader, 30)
    described = _describe(left)
    for pid in left:  # do not leave them to the next test (they hold its output pipes, too)
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not left, described


def test_sigterm_during_setup_exits_75_and_releases_the_lock(demo: Path, tmp_path: Path) -> None:
    opts = tiny_opts(demo, tmp_path, name="early", TRAIN__MAX_STEPS=400, DATA__NUM_WORKERS=1)
    run = run_dir(tmp_path, "early")
    proc = spawn_cmd([PY, "-m", "linnaeus.train", *train_cmd(opts)[3:]])
    wait_for(lambda: (run / "run.lock").is_file(), proc, timeout=300)  # taken mid-setup, before the model exists
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-4000:]
    assert "during setup" in err and "Traceback" not in err, err[-4000:]
    assert not (run / "run.lock").exists()
    assert _train_rows(run) == 0


def test_sigkill_of_the_launcher_group_ends_every_process_and_the_rerun_resumes(demo: Path, tmp_path: Path) -> None:
    """An OOM-killed launcher or a killed terminal: torch elastic runs each rank in a session of its own, so the
    ranks and their loaders must notice on their own, checkpoint, and leave the folder to the rerun."""
    opts = tiny_opts(demo, tmp_path, name="orphan", TRAIN__MAX_STEPS=4000, DATA__NUM_WORKERS=1)
    run = run_dir(tmp_path, "orphan")
    port = ["--main_process_port", str(free_port())]
    proc = spawn_cmd(train_cmd(opts, "cpu_zero2", extra=port))
    wait_for(lambda: _train_rows(run) >= 3, proc, timeout=600)
    everything = descendants(proc.pid)
    assert len(everything) >= 4, _describe(everything)  # 2 ranks and their loader processes
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    left = _gone_within(everything, 60)
    described = _describe(left)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not left, described
    stopped = _latest_step(run)
    assert stopped is not None and stopped == metrics(run, "train")[-1]["step"]
    assert not (run / "run.lock").exists()

    again = spawn_cmd(train_cmd(opts, "cpu_zero2", extra=port))  # the same command
    log = run / "logs" / "train.log"
    wait_for(lambda: f"resumed from step {stopped}" in log.read_text(), again, timeout=600)
    signal_tree(again, signal.SIGTERM)
    again.communicate(timeout=300)
    left = _gone_within([again.pid, *descendants(again.pid)], 60)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
