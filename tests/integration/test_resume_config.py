"""A rerun into a run folder with another config: refused in one line when it changes what the weights mean, logged
(and the old config kept) when it only says how long or how often."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch_utils import launch, run_dir, tiny_opts

pytestmark = pytest.mark.slow


def _opts(demo: Path, out: Path, **overrides: object) -> list[str]:
    opts = tiny_opts(demo, out, name="rc", **overrides)
    i = opts.index("TRAIN.MAX_STEPS")  # epochs decide the length here
    return opts[:i] + opts[i + 2 :]


def _latest_step(run: Path) -> int:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return json.loads((run / "checkpoints" / latest / "trainer_state.json").read_text())["step"]


def test_changed_config_is_refused_then_stretched_then_allowed(demo: Path, tmp_path: Path) -> None:
    run = run_dir(tmp_path, "rc")
    launch(_opts(demo, tmp_path, TRAIN__EPOCHS=1))
    steps = _latest_step(run)
    first = (run / "config.yaml").read_bytes()

    refused = launch(_opts(demo, tmp_path, TRAIN__EPOCHS=1, LR_SCHEDULER__BASE_LR=0.5), check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "LR_SCHEDULER.BASE_LR" in errors[0] and "-> 0.5" in errors[0] and str(run / "config.yaml") in errors[0]
    assert "TRAIN.RESUME_CONFIG_CHANGE allow" in errors[0]
    assert (run / "config.yaml").read_bytes() == first and _latest_step(run) == steps

    # An accepted change whose resume then fails leaves config.yaml as it was (it still describes the checkpoints).
    optimizer_file = next((run / "checkpoints" / f"step_{steps}").glob("optimizer*.bin"))
    intact = optimizer_file.read_bytes()
    optimizer_file.write_bytes(intact[: len(intact) // 2])
    broken = launch(_opts(demo, tmp_path, TRAIN__EPOCHS=2), check=False)
    assert broken.returncode != 0 and "TRAIN.EPOCHS: 1.0 -> 2.0" in broken.stderr
    assert (run / "config.yaml").read_bytes() == first and not list(run.glob("config.step_*.yaml"))
    optimizer_file.write_bytes(intact)

    stretched = launch(_opts(demo, tmp_path, TRAIN__EPOCHS=2))
    assert f"the schedule was stretched from {steps} to {2 * steps} steps" in stretched.stderr
    assert "TRAIN.EPOCHS: 1.0 -> 2.0" in stretched.stderr
    assert _latest_step(run) == 2 * steps
    assert (run / f"config.step_{steps}.yaml").read_bytes() == first  # the folder keeps its history
    assert "EPOCHS: 2.0" in (run / "config.yaml").read_text()

    allowed = launch(
        _opts(demo, tmp_path, TRAIN__EPOCHS=3, LR_SCHEDULER__BASE_LR=0.5, TRAIN__RESUME_CONFIG_CHANGE="allow")
    )
    assert "allowed by TRAIN.RESUME_CONFIG_CHANGE" in allowed.stderr and "LR_SCHEDULER.BASE_LR" in allowed.stderr
    assert f"resumed from step {2 * steps}" in allowed.stderr
    assert _latest_step(run) == 3 * steps
    assert (run / f"config.step_{2 * steps}.yaml").is_file() and "BASE_LR: 0.5" in (run / "config.yaml").read_text()


def _one_error(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_a_resume_never_trains_on_a_new_split(demo: Path, tmp_path: Path) -> None:
    """Issue 26: after a labels change the error said to delete split.npz; doing so resumed the old checkpoint on
    a new split (validation rows it had trained on). The split's digest is in every checkpoint: refused."""
    import shutil

    import h5py

    labels = tmp_path / "labels.h5"
    shutil.copy(demo / "labels.h5", labels)
    run = run_dir(tmp_path, "split")

    def opts(steps: int) -> list[str]:
        return tiny_opts(
            demo,
            tmp_path,
            name="split",
            DATA__H5__LABELS_PATH=str(labels),
            TRAIN__MAX_STEPS=steps,
            SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 4}",
        )

    launch(opts(4))
    state = json.loads((run / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert len(state["split_digest"]) == 64

    # Issue 26 (5): TRAIN.AUTO_RESUME False into this folder would start a second run beside the first: refused.
    second = _one_error(launch([*opts(8), "TRAIN.AUTO_RESUME", "False"], check=False))
    assert str(run) in second and "never holds two runs" in second and "EXPERIMENT.NAME" in second
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_4"]
    with h5py.File(labels, "a") as fh:  # the labels change after the run started
        fh.attrs["curated"] = "v2"

    changed = _one_error(launch(opts(8), check=False))
    assert "labels changed" in changed and "start a new run" in changed and "delete the file" not in changed

    (run / "split.npz").unlink()  # what the old advice said to do
    line = _one_error(launch(opts(8), check=False))
    assert "another train/validation split" in line and str(run / "checkpoints" / "step_4") in line
    assert _latest_step(run) == 4
