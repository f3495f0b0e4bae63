"""Experiment trackers through accelerate: which ones, where they write, and the W&B pre-flight.

``EXPERIMENT.TRACKERS`` lists tracker names (``wandb``, ``tensorboard``, ``csv`` and the others accelerate knows);
``EXPERIMENT.WANDB.ENABLED True`` keeps meaning "wandb is on". The trainer passes ``TrackerPlan.accelerator_kwargs()``
to ``Accelerator(...)`` and ``TrackerPlan.init_kwargs(config)`` to ``accelerator.init_trackers(...)``.
"""

from __future__ import annotations

import configparser
import csv
import netrc
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from linnaeus.errors import ConfigError
from linnaeus.specs.engine import TrackingSpec

CSV_FILE = "tracker_metrics.csv"
TENSORBOARD_DIR = "tensorboard"
WANDB_FIX = "set WANDB_MODE=offline (sync later with `wandb sync`) or EXPERIMENT.WANDB.ENABLED False"


def _accelerate_tracker_names() -> list[str]:
    from accelerate.utils import LoggerType

    return [t.value for t in LoggerType if t.value != "all"]


def tracker_names(spec: TrackingSpec) -> list[str]:
    """The trackers this run logs to, in config order, without repeats; wandb included when W&B is enabled."""
    wanted = list(spec.trackers)
    known = ["csv", *_accelerate_tracker_names()]
    names: list[str] = []
    for n in wanted:
        if n not in known:
            raise ConfigError(f"EXPERIMENT.TRACKERS: unknown tracker {n!r}; expected some of {', '.join(known)}")
        if n not in names:
            names.append(n)
    return names


def csv_tracker(path: Path) -> Any:
    """An accelerate tracker writing long-format CSV (``step,key,value``): one row per logged number, so phases with
    different keys share one file and a spreadsheet can pivot it. Appended across restarts, like metrics.jsonl."""
    from accelerate.tracking import GeneralTracker

    class CsvTracker(GeneralTracker):
        name = "csv"
        requires_logging_directory = False
        main_process_only = True

        def __init__(self, path: Path) -> None:
            super().__init__()
            self.path = Path(path)

        @property
        def tracker(self) -> Path:
            return self.path

        def store_init_configuration(self, values: dict) -> None:
            pass  # the run folder's config.yaml is the record of the configuration

        def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.is_file()
            with self.path.open("a", newline="") as fh:
                w = csv.writer(fh)
                if new:
                    w.writerow(["step", "key", "value"])
                for k, v in values.items():
                    if isinstance(v, int | float | str) and not isinstance(v, bool):
                        w.writerow(["" if step is None else step, k, v])

    return CsvTracker(path)


@dataclass
class TrackerPlan:
    names: list[str]
    run: Path
    project: str
    init: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.names)

    @property
    def logging_dir(self) -> Path:
        return self.run / TENSORBOARD_DIR

    def accelerator_kwargs(self) -> dict[str, Any]:
        """``log_with`` and ``project_config`` for ``Accelerator(**kwargs)``; empty when no tracker is on."""
        if not self.names:
            return {}
        from accelerate.utils import ProjectConfiguration

        log_with: list[Any] = [csv_tracker(self.run / CSV_FILE) if n == "csv" else n for n in self.names]
        return {
            "log_with": log_with,
            # TensorBoard writes to logging_dir/<project>: RUN/tensorboard/<project>.
            "project_config": ProjectConfiguration(project_dir=str(self.run), logging_dir=str(self.logging_dir)),
        }

    def init_kwargs(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments for ``accelerator.init_trackers(**kwargs)``."""
        return {"project_name": self.project, "config": flat_config(config), "init_kwargs": dict(self.init)}


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys with scalar values: TensorBoard's hparams take only bool/int/float/str (lists become strings)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= flat_config(v, f"{key}.")
        elif v is None or isinstance(v, bool | int | float | str):
            out[key] = v if v is not None else "None"
        else:
            out[key] = str(v)
    return out


def plan_trackers(spec: TrackingSpec, run: Path, wandb_run_id: str | None = None) -> TrackerPlan:
    """What to log to and how. ``wandb_run_id`` (saved in the trainer state) reattaches a resumed run."""
    names = tracker_names(spec)
    init: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        init["wandb"] = {
            "name": spec.name,
            "group": spec.group,
            "tags": list(spec.tags) + list(spec.wandb_tags),
            "notes": spec.notes,
            "entity": spec.wandb_entity,
            "id": wandb_run_id or spec.wandb_run_id,
            "resume": "allow",
            "dir": str(run),
            **({"mode": spec.wandb_mode} if spec.wandb_mode else {}),
        }
    project = (spec.wandb_project if "wandb" in names and spec.wandb_project else None) or spec.project
    return TrackerPlan(names=names, run=Path(run), project=project, init=init)


# ------------------------------------------------------------------------------------------------ W&B pre-flight
def _wandb_host(environ: Mapping[str, str]) -> str:
    base = environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    return urlparse(base).hostname or base


def _netrc_has(host: str, environ: Mapping[str, str], home: Path) -> bool:
    candidates = [Path(environ["NETRC"])] if environ.get("NETRC") else [home / ".netrc", home / "_netrc"]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            auth = netrc.netrc(str(path)).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue  # wandb could not use it either; fall through to "no credentials"
        if auth and auth[2]:
            return True
    return False


def _settings_mode(environ: Mapping[str, str], home: Path) -> str | None:
    """The mode `wandb offline` / `wandb disabled` saved in wandb's user settings file."""
    config_dir = Path(environ.get("WANDB_CONFIG_DIR") or home / ".config" / "wandb")
    path = config_dir / "settings"
    if not path.is_file():
        return None
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return None
    return parser.get("default", "mode", fallback=None)


def wandb_preflight(spec: TrackingSpec, environ: Mapping[str, str] | None = None, home: Path | None = None) -> None:
    """Before any heavy work: W&B on, online, and no credentials -> ConfigError with the two fixes.

    wandb would otherwise prompt on a terminal (the job hangs) or fail with long tracebacks after the model is built.
    Credentials: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, or a ~/.netrc (or $NETRC) entry for the W&B host."""
    environ = os.environ if environ is None else environ
    home = Path(environ.get("HOME") or Path.home()) if home is None else home
    if "wandb" not in tracker_names(spec):
        return
    mode = (spec.wandb_mode or environ.get("WANDB_MODE") or _settings_mode(environ, home) or "online").lower()
    if environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        mode = "disabled"
    if mode in ("offline", "disabled", "dryrun"):
        return
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = _wandb_host(environ)
    if _netrc_has(host, environ, home):
        return
    raise ConfigError(
        f"EXPERIMENT.WANDB.ENABLED: W&B is on but this machine has no W&B credentials (no WANDB_API_KEY, no "
        f"~/.netrc entry for {host}); {WANDB_FIX}, or run `wandb login` first"
    )
