"""Resuming a run folder with another config: what is logged, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from linnaeus.config import config_to_dict, load_config
from linnaeus.engine.config_change import (
    ConfigRecord,
    check_resume_config,
    config_changes,
    plan_config_record,
    schedule_change_line,
    write_config_record,
)
from linnaeus.errors import ConfigError


def _cfg(*opts: str) -> dict:
    return config_to_dict(load_config(None, list(opts)))


def test_no_change_no_lines():
    assert check_resume_config(_cfg(), _cfg(), allow=False, where=Path("run/config.yaml")) == []


def test_epochs_and_intervals_are_logged_not_refused():
    saved = _cfg("TRAIN.EPOCHS", "5")
    now = _cfg("TRAIN.EPOCHS", "8", "DATA.NUM_WORKERS", "2", "SCHEDULE.VALIDATION.INTERVAL", "{STEPS: 7}")
    lines = check_resume_config(saved, now, allow=False, where=Path("r/config.yaml"))
    assert any("TRAIN.EPOCHS: 5.0 -> 8.0" in line or "TRAIN.EPOCHS: 5 -> 8" in line for line in lines)
    assert any("DATA.NUM_WORKERS" in line for line in lines)
    assert any("SCHEDULE.VALIDATION.INTERVAL.STEPS" in line for line in lines)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("LR_SCHEDULER.BASE_LR", "0.5"),
        ("MODEL.DROP_PATH_RATE", "0.3"),
        ("DATA.META.ACTIVE", "false"),
        ("DATA.TASK_KEYS_H5", "[taxa_L10]"),
        ("AUG.RRC_SCALE", "[0.5, 1.0]"),
    ],
)
def test_meaning_changes_are_refused_in_one_line_unless_allowed(key, value):
    saved, now = _cfg(), _cfg(key, value)
    with pytest.raises(ConfigError) as err:
        check_resume_config(saved, now, allow=False, where=Path("r/config.yaml"))
    msg = str(err.value)
    assert "\n" not in msg and key in msg and "TRAIN.RESUME_CONFIG_CHANGE allow" in msg and "r/config.yaml" in msg
    lines = check_resume_config(saved, now, allow=True, where=Path("r/config.yaml"))
    assert any(key in line and "allowed" in line for line in lines)


def test_keys_unknown_to_one_side_are_not_changes():
    saved = _cfg()
    saved["TRAIN"] = dict(saved["TRAIN"], SOME_OLD_KEY=1)
    assert config_changes(saved, _cfg()) == []


def test_schedule_stretch_line():
    assert schedule_change_line(None, 10) is None and schedule_change_line(10, 10) is None
    assert "stretched from 10 to 16 steps" in schedule_change_line(10, 16)
    assert "shortened from 16 to 10 steps" in schedule_change_line(16, 10)


def _folder(tmp_path: Path, *opts: str) -> tuple[Path, Path]:
    from linnaeus.config import dump_config

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_4"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(load_config(None, list(opts))))
    return run, ckpt


def test_record_fresh_start_writes_and_same_config_leaves_the_file_alone(tmp_path: Path) -> None:
    run, ckpt = _folder(tmp_path)
    assert plan_config_record(run, None, _cfg("TRAIN.EPOCHS", "9"), allow=False) == ConfigRecord([], write=True)
    assert plan_config_record(run, ckpt, _cfg(), allow=False) == ConfigRecord([], write=False)


def test_record_keeps_the_old_config_under_a_free_name(tmp_path: Path) -> None:
    run, ckpt = _folder(tmp_path)
    old = (run / "config.yaml").read_text()
    (run / "config.step_4.yaml").write_text("an earlier resume from the same step")
    record = plan_config_record(run, ckpt, _cfg("TRAIN.EPOCHS", "9"), allow=False)
    assert record.keep_old_as == "config.step_4.1.yaml" and any("TRAIN.EPOCHS" in line for line in record.lines)
    write_config_record(record, run, "new: 1\n")
    assert (run / "config.step_4.1.yaml").read_text() == old and (run / "config.yaml").read_text() == "new: 1\n"


def test_record_compares_with_the_checkpoints_own_run_folder(tmp_path: Path) -> None:
    source, ckpt = _folder(tmp_path, "LR_SCHEDULER.BASE_LR", "0.25")
    fresh = tmp_path / "another_run"  # TRAIN.RESUME_FROM a checkpoint of another folder
    with pytest.raises(ConfigError, match=r"LR_SCHEDULER\.BASE_LR: 0\.25 -> 0\.0001: differs from .*/run/config\.yaml"):
        plan_config_record(fresh, ckpt, _cfg(), allow=False)
    record = plan_config_record(fresh, ckpt, _cfg(), allow=True)
    assert record.write and record.keep_old_as is None and "allowed by" in record.lines[0]
    assert str(source / "config.yaml") in record.lines[0]


def test_keys_added_or_removed_inside_free_form_blocks_are_changes():
    """Issue 26: removing `label_smoothing` from a loss's PARAMS on resume was neither listed nor refused."""
    import copy

    from linnaeus.config import repo_root

    saved = config_to_dict(load_config(repo_root() / "configs/experiments/demo.yaml", []))
    now = copy.deepcopy(saved)
    params = now["MODEL"]["CLASSIFICATION"]["HEADS"]["taxa_L10"]["LOSS"]["PARAMS"]
    assert params.pop("label_smoothing") == 0.05
    key = "MODEL.CLASSIFICATION.HEADS.taxa_L10.LOSS.PARAMS.label_smoothing"
    assert [c.line() for c in config_changes(saved, now)] == [f"{key}: 0.05 -> (absent)"]
    assert [c.line() for c in config_changes(now, saved)] == [f"{key}: (absent) -> 0.05"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + r": 0\.05 -> \(absent\)"):
        check_resume_config(saved, now, allow=False, where=Path("r/config.yaml"))
    now["MODEL"]["PARAMS"] = {"depth_scale": 2}  # a model registered outside Linnaeus: its settings are free-form
    assert "MODEL.PARAMS.depth_scale: (absent) -> 2" in [c.line() for c in config_changes(saved, now)]
    now = copy.deepcopy(saved)
    now["MODEL"]["CLASSIFICATION"]["HEADS"]["taxa_L10"]["SOME_NEW_KEY"] = 1  # a newer release's key: no change
    assert config_changes(saved, now) == []
    del now["MODEL"]["CLASSIFICATION"]["HEADS"]["taxa_L30"]  # a whole head removed: every key of it is listed
    assert any(c.key.startswith("MODEL.CLASSIFICATION.HEADS.taxa_L30.") for c in config_changes(saved, now))
