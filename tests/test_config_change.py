"""Resuming a run folder with another config: what is logged, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from linnaeus.config import config_to_dict, load_config
from linnaeus.engine.config_change import check_resume_config, config_changes, schedule_change_line
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
