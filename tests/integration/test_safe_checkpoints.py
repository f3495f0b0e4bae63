"""No code runs from a run folder: a poisoned pickle in a real ZeRO-2 checkpoint is refused by `export --run`,
`predict --run` and resume with one line, and its payload never executes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import write_jpeg

from launch_utils import PY, ROOT, env, run_dir, tiny_opts, train_cmd

pytestmark = pytest.mark.slow


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def zero2_run(four_step_run) -> Path:
    """A 4-step 2-process ZeRO-2 run checkpointed at step 4, shared by the session: tests poison copies of it."""
    return four_step_run("cpu_zero2")


def _poisoned_copy(run: Path, tmp_path: Path, relative: str) -> tuple[Path, Path]:
    """A copy of the run without export/ (as after a preemption) whose file `relative` (under step_4) runs code."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "export", ignore_errors=True)
    marker = tmp_path / "PWNED"
    target = copy / "checkpoints" / "step_4" / relative
    assert target.is_file(), f"{relative} not written by this launch"
    torch.save({"optimizer_state_dict": Payload(marker)}, target)
    return copy, marker


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "linnaeus", *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300
    )


def _one_error_line(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "relative", ["pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt", "pytorch_model/mp_rank_00_model_states.pt"]
)
def test_export_and_predict_never_unpickle_code(zero2_run: Path, tmp_path: Path, relative: str) -> None:
    run, marker = _poisoned_copy(zero2_run, tmp_path, relative)
    proc = _cli("export", "--run", str(run), "--out", str(tmp_path / "bundle"), "--which", "final")
    _one_error_line(proc, "it would call posix.system")
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "bundle").exists()

    proc = _cli("predict", "--run", str(run), str(write_jpeg(tmp_path / "x.jpg")), "--device", "cpu")
    _one_error_line(proc, "it would call posix.system")
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("relative", ["pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt", "random_states_1.pkl"])
def test_resume_refuses_a_poisoned_checkpoint_before_loading_it(
    demo: Path, zero2_run: Path, tmp_path: Path, relative: str
) -> None:
    run, marker = _poisoned_copy(zero2_run, tmp_path, relative)
    # Same process count and ZeRO stage: DeepSpeed's own loader (weights_only=False) would be the one to run it.
    ckpt = str(run / "checkpoints" / "step_4")
    opts = tiny_opts(
        demo,
        tmp_path / "out",
        name="resumed",
        TRAIN__MAX_STEPS=8,
        TRAIN__RESUME_FROM=ckpt,
        TRAIN__RESUME_CONFIG_CHANGE="allow",
    )
    proc = subprocess.run(
        train_cmd(opts, "cpu_zero2"), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode != 0
    assert "refers to posix.system" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists(), "the payload ran"


def _symlinked_payload_copy(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Issue 26's attack on a copy of the run: `pytorch_model/` moved out of the folder and linked back, with a
    payload in `mp_rank_00_model_states.pt`. The copy sits where the same training command writes."""
    copy = run_dir(tmp_path / "out", run.name)
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "export", ignore_errors=True)
    step = copy / "checkpoints" / "step_4"
    evil = tmp_path / "x" / "evil"
    evil.parent.mkdir()
    shutil.move(step / "pytorch_model", evil)
    (step / "pytorch_model").symlink_to(evil, target_is_directory=True)
    marker = tmp_path / "PWNED"
    torch.save({"module": Payload(marker)}, evil / "mp_rank_00_model_states.pt")
    return copy, marker


def test_a_payload_behind_a_symlinked_folder_never_runs(demo: Path, zero2_run: Path, tmp_path: Path) -> None:
    run, marker = _symlinked_payload_copy(zero2_run, tmp_path)
    # Rerunning the training command (auto-resume of the folder's own checkpoint, longer plan).
    opts = tiny_opts(
        demo, tmp_path / "out", name=run.name, TRAIN__MAX_STEPS=8, SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 4}"
    )
    proc = subprocess.run(
        train_cmd(opts, "cpu_zero2"), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode != 0
    assert "outside" in proc.stderr and "pytorch_model" in proc.stderr, proc.stderr[-3000:]
    assert "resumed from step" not in proc.stderr
    assert not marker.exists(), "the payload ran"

    proc = _cli("export", "--run", str(run), "--out", str(tmp_path / "bundle"), "--which", "final")
    _one_error_line(proc, "outside")
    assert not (tmp_path / "bundle").exists()
    proc = _cli("predict", "--run", str(run), str(write_jpeg(tmp_path / "x.jpg")), "--device", "cpu")
    _one_error_line(proc, "outside")
    assert not marker.exists(), "the payload ran"


def test_a_payload_in_any_checkpoint_file_is_refused_by_every_reader(zero2_run: Path, tmp_path: Path) -> None:
    """Every pickle a resume (scan, then DeepSpeed/accelerate under the weights-only guard), `export --run` or
    `predict --run` (consolidation) reads: each refuses the payload with one line and it never runs."""
    from linnaeus.engine.checkpoint import consolidated_state_dict
    from linnaeus.engine.safe_files import verify_checkpoint_files, weights_only_loads
    from linnaeus.errors import DataError

    step = zero2_run / "checkpoints" / "step_4"
    pickles = sorted(p.relative_to(step) for p in step.rglob("*") if p.suffix in (".pt", ".pkl", ".bin"))
    assert len(pickles) >= 5, pickles  # model states, one optimizer shard per rank, one RNG file per rank
    for i, relative in enumerate(pickles):
        base = tmp_path / str(i)
        run, marker = _poisoned_copy(zero2_run, base, str(relative))
        ckpt = run / "checkpoints" / "step_4"
        with pytest.raises(DataError, match=r"posix\.system"):
            verify_checkpoint_files(ckpt)
        with pytest.raises(DataError, match=r"posix\.system"), weights_only_loads():
            torch.load(ckpt / relative, map_location="cpu", weights_only=False)
        if relative.parent.name == "pytorch_model":
            with pytest.raises(DataError, match=r"posix\.system"):
                consolidated_state_dict(ckpt)
        assert not marker.exists(), f"the payload in {relative} ran"
