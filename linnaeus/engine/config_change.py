"""What changed between the config a run folder was started with and the one resuming it, and whether that is allowed.

A run folder describes its weights: ``config.yaml`` is the config they were trained with. Resuming with another
config is fine for keys that only say how long, how often or where (epochs, intervals, workers, loggers, the batch
split when the process count changes), and wrong for keys that change what the weights mean or how they are trained
(model, data, task keys, metadata, losses, optimizer, LR, augmentation): those are refused unless
``TRAIN.RESUME_CONFIG_CHANGE: allow``, so a rerun with an edited config never silently continues the old weights.
Every difference is listed either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from linnaeus.errors import ConfigError

# Dotted prefixes of keys that may differ on resume without changing what the weights are. Anything else that
# differs is a change of the experiment itself.
RESUMABLE_PREFIXES: tuple[str, ...] = (
    "TRAIN.EPOCHS",
    "TRAIN.MAX_STEPS",
    "TRAIN.AUTO_RESUME",
    "TRAIN.RESUME_FROM",
    "TRAIN.RESUME_CONFIG_CHANGE",
    "TRAIN.BATCH_SIZE",  # alias of DATA.BATCH_SIZE: the split of the global batch (see the plan check below)
    "TRAIN.ACCUMULATION_STEPS",
    "TRAIN.NONFINITE",
    "DATA.BATCH_SIZE",
    "DATA.BATCH_SIZE_VAL",
    "DATA.NUM_WORKERS",
    "DATA.PIN_MEMORY",
    "DATA.PREFETCH_FACTOR",
    "DATA.DECODE",
    "DATA.HYBRID.IMAGES_DIR",  # the same images moved (the split and labels fingerprint are checked separately)
    "DATA.HYBRID.VERIFY_IMAGES",
    "DATA.SHARDS.DIR",
    "DATA.SHARDS.VERIFY",
    "DATA.H5.LABELS_PATH",  # likewise: a moved labels file is checked by its fingerprint
    "DATA.H5.TRAIN_LABELS_PATH",
    "DATA.H5.VAL_LABELS_PATH",
    "DATA.TAXONOMY_PATH",
    "MODEL.COMPILE",
    "MODEL.PRETRAINED",  # the starting weights only matter on a fresh start; a resume continues its checkpoint
    "MODEL.PRETRAINED_SOURCE",
    "MODEL.PRETRAINED_CONVNEXT",
    "MODEL.PRETRAINED_ROPEVIT",
    "SCHEDULE.VALIDATION",
    "SCHEDULE.CHECKPOINT",
    "SCHEDULE.METRICS",
    "EXPERIMENT.TAGS",
    "EXPERIMENT.NOTES",
    "EXPERIMENT.LOG_LEVEL",
    "EXPERIMENT.WANDB",
    "EXPERIMENT.TRACKERS",
    "EXPERIMENT.OUTPUT_DIR",
    "MISC.DETERMINISTIC",
    "BASE_RESOLVED",  # where the BASE files were found: informational, their content is in the keys above
)


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    @property
    def resumable(self) -> bool:
        return any(self.key == p or self.key.startswith(p + ".") for p in RESUMABLE_PREFIXES)

    def line(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping → {dotted key: leaf value}; lists are leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[Change]:
    """Keys whose values differ between two resolved configs (keys only one version of Linnaeus knows are skipped:
    a newer release adding a key with its default is not a change of the experiment)."""
    old, new = flatten(saved), flatten(current)
    return [Change(k, old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]


def read_saved_config(path: Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(
            f"{path}: the run's saved config cannot be read ({type(err).__name__}); expected the "
            "config.yaml this run folder was started with"
        ) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the run's saved config is not a mapping")
    return tree


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], allow: bool, where: Path) -> list[str]:
    """Log lines describing every difference; ConfigError (one line) when a non-resumable key changed and the user
    did not allow it."""
    changes = config_changes(saved, current)
    refused = [c for c in changes if not c.resumable]
    if refused and not allow:
        more = f" (+{len(refused) - 1} more)" if len(refused) > 1 else ""
        raise ConfigError(
            f"{refused[0].line()}{more}: differs from {where}, the config these checkpoints were trained with; "
            "resume with the same value, start a new run (another EXPERIMENT.NAME, or TRAIN.AUTO_RESUME False to "
            "start this folder afresh), or set TRAIN.RESUME_CONFIG_CHANGE allow to continue these weights anyway"
        )
    lines = [f"resume: config changed since {where}: {c.line()}" for c in changes if c.resumable]
    lines += [
        f"resume: config changed since {where} (allowed by TRAIN.RESUME_CONFIG_CHANGE): {c.line()}" for c in refused
    ]
    return lines


def schedule_change_line(saved_total_steps: int | None, total_steps: int) -> str | None:
    """The log line when the resumed run's step plan differs from the one the checkpoint was made under."""
    if saved_total_steps is None or int(saved_total_steps) == int(total_steps):
        return None
    verb = "stretched" if total_steps > saved_total_steps else "shortened"
    return (
        f"resume: the schedule was {verb} from {saved_total_steps} to {total_steps} steps (LR and ramps follow the "
        "new length from here on)"
    )
