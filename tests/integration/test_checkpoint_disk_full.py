"""Disk full while checkpointing, on a real (tiny) filesystem: one line naming the folder and the bytes needed,
`latest` still at a complete checkpoint, no temporary files left."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from launch_utils import ensure_demo, launch, run_dir, tiny_opts

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    # 32 MB: room for one checkpoint of the tiny model (~17 MB) and the run's logs, not for a second one.
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.decode().strip()[:100]})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_during_checkpoint_is_one_line_and_keeps_latest(tmp_path_factory, small_disk: Path) -> None:
    demo = ensure_demo(tmp_path_factory.getbasetemp(), per_species=30)
    opts = tiny_opts(
        demo,
        small_disk,
        name="full",
        TRAIN__MAX_STEPS=6,
        SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 2}",
        SCHEDULE__CHECKPOINT__KEEP_LAST_N=1,
    )
    proc = launch(opts, check=False)
    run = run_dir(small_disk, "full")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"{run / 'checkpoints'}: not enough disk space for checkpoint step_4" in errors[0]
    assert "bytes needed" in errors[0] and "latest complete checkpoint: step_2" in errors[0]
    assert "Traceback" not in proc.stderr
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_2"
    assert (ckpts / "step_2" / "trainer_state.json").is_file()
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_2"]  # no .tmp_step_4, no .latest.*.tmp
