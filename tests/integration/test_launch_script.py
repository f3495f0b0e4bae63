"""launch.sh's exit-75 handling. No SLURM here: `srun`, `scontrol` and the launcher are stand-in scripts on PATH that
record how they were called; the shell logic under test is the real launch.sh."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from launch_utils import ROOT


def _script(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("launcher_exit", [75, 0, 3])
def test_launch_sh_requeues_on_75_and_passes_the_status_through(tmp_path: Path, launcher_exit: int) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    _script(bin_dir / "scontrol", f'if [ "$1" = show ]; then echo node0; else echo "scontrol $*" >> {calls}; fi\n')
    # srun: drop its options, run the task as node 0
    _script(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n')
    _script(bin_dir / "linnaeus", f'echo "linnaeus $*" >> {calls}\nexit {launcher_exit}\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node0", SLURM_JOB_ID="123")
    env.update(SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="2", LINNAEUS_VENV=str(tmp_path / "novenv"))
    proc = subprocess.run(
        ["bash", str(ROOT / "launch.sh"), "configs/experiments/demo.yaml", "--opts", "TRAIN.EPOCHS", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == launcher_exit, proc.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("linnaeus launch --config_file accelerate_configs/multi_node_zero2.yaml")
    assert lines[0].endswith("-m linnaeus.train --cfg configs/experiments/demo.yaml --opts TRAIN.EPOCHS 2")
    assert ("scontrol requeue 123" in lines) == (launcher_exit == 75)


def test_launch_sh_requeues_after_term_reaches_every_process(tmp_path: Path) -> None:
    """SLURM's `--signal=TERM@120` reaches every process of the step: launch.sh, srun, the `bash -c` wrapper srun
    runs, the launcher (which checkpoints and exits 75) and its children. The job must still be requeued."""
    import signal
    import time

    from launch_utils import descendants

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    _script(bin_dir / "scontrol", f'if [ "$1" = show ]; then echo node0; else echo "scontrol $*" >> {calls}; fi\n')
    # srun: a process of its own that forwards what it gets to its task and reports the task's status, as srun does
    _script(
        bin_dir / "srun",
        'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 "$@" &\nchild=$!\n'
        "trap 'kill -TERM \"$child\" 2>/dev/null' TERM\n"
        'while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done\nexit "$status"\n',
    )
    # the launcher: the ranks take a moment to checkpoint, then it exits 75
    _script(
        bin_dir / "linnaeus",
        f'trap \'echo "checkpointing" >> {calls}; sleep 1; exit 75\' TERM\necho "linnaeus started" >> {calls}\n'
        "while :; do sleep 0.1; done\n",
    )
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node0", SLURM_JOB_ID="123")
    env.update(SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="2", LINNAEUS_VENV=str(tmp_path / "novenv"))
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch.sh"), "configs/experiments/demo.yaml"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 30
    while not (calls.is_file() and "linnaeus started" in calls.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "scontrol requeue 123" in calls.read_text().splitlines(), calls.read_text() + err
