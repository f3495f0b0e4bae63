"""CheckpointManager's file rules without a launch: pointer fallback, partial folders, best ranking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from linnaeus.engine.checkpoint import CheckpointManager
from linnaeus.errors import ConfigError


def _complete(root: Path, step: int) -> None:
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"step": step}))


def test_latest_follows_the_pointer_and_falls_back_when_it_dangles(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=2, keep_best=1, best_metric="val/x", best_mode="max")
    assert m.latest() is None
    _complete(tmp_path, 5)
    _complete(tmp_path, 10)
    (tmp_path / "latest").write_text("step_5\n")
    assert m.latest() == tmp_path / "step_5"
    (tmp_path / "latest").write_text("step_15\n")  # killed between removing step_15 and renaming its new copy
    assert m.latest() == tmp_path / "step_10"
    (tmp_path / ".tmp_step_15").mkdir()
    m.clean_partial()
    assert not (tmp_path / ".tmp_step_15").exists()


def test_dangling_pointer_without_any_checkpoint_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "latest").write_text("step_3\n")
    (tmp_path / "step_3").mkdir()  # never completed: no trainer_state.json
    m = CheckpointManager(tmp_path, keep_last=1, keep_best=0, best_metric="val/x", best_mode="max")
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        m.latest()


def test_bests_are_ranked_by_mode_and_bounded(tmp_path: Path) -> None:
    up = CheckpointManager(tmp_path, keep_last=1, keep_best=2, best_metric="val/acc", best_mode="max")
    bests: list[dict] = []
    for step, value in [(1, 0.2), (2, 0.5), (3, 0.4), (4, 0.1)]:
        bests = up.update_bests(bests, step, {"val/acc": value})
    assert [b["step"] for b in bests] == [2, 3]
    down = CheckpointManager(tmp_path, keep_last=1, keep_best=1, best_metric="val/loss", best_mode="min")
    bests = []
    for step, value in [(1, 0.9), (2, 0.3), (3, 0.6)]:
        bests = down.update_bests(bests, step, {"val/loss": value})
    assert bests == [{"dir": "step_2", "step": 2, "value": 0.3}]
    assert down.update_bests(bests, 4, {"other": 1.0}) == bests  # metric absent: unchanged


def test_clean_partial_removes_a_pointer_write_a_kill_interrupted(tmp_path: Path) -> None:
    _complete(tmp_path, 5)
    (tmp_path / "latest").write_text("step_5\n")
    (tmp_path / ".latest.k3j9.tmp").write_text("step_1")
    m = CheckpointManager(tmp_path, keep_last=2, keep_best=1, best_metric="val/x", best_mode="max")
    m.clean_partial()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_5"]


def test_a_full_disk_costs_the_log_file_one_line_not_a_traceback_per_record(capfd) -> None:
    """Issue 26: filling the disk between checkpoints added a logging traceback to the one-line error."""
    import logging

    from linnaeus.engine.log_file import RunLogFile

    logger = logging.getLogger("linnaeus.test_full_disk")
    logger.propagate = False
    handler = RunLogFile("/dev/full", mode="a")  # every write fails with ENOSPC
    logger.addHandler(handler)
    try:
        for i in range(3):
            logger.warning("record %d", i)
    finally:
        logger.removeHandler(handler)
        handler.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [
        "warning: cannot write to /dev/full (No space left on device); records from here on are shown on the console only"
    ]


def test_disk_full_advice_names_what_frees_enough(tmp_path) -> None:
    """Lowering KEEP_LAST_N / KEEP_BEST_N frees nothing for the checkpoint that did not fit (retention runs after a
    checkpoint is complete): the advice names the bytes to free and the checkpoints a resume does not need."""
    import json

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    (root / "latest").write_text("step_4\n")
    manager = CheckpointManager(root, keep_last=2, keep_best=1, best_metric="m", best_mode="max")
    line = str(manager._no_space(6, needed=1000, free=400))
    assert "Free at least 600 bytes" in line and "step_2" in line and "latest complete checkpoint: step_4" in line
    assert "one more checkpoint than SCHEDULE.CHECKPOINT.KEEP_LAST_N" in line and "\n" not in line
