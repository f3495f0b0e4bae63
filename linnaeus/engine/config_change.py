"""What changed between the config a run folder was started with and the one resuming it, and whether that is allowed.

A run folder describes its weights: ``config.yaml`` is the config they were trained with. Resuming with another
config is fine for keys that only say how long, how often or where (epochs, intervals, workers, loggers, the batch
split when the process count changes), and wrong for keys that change what the weights mean or how they are trained
(model, data, task keys, metadata, losses, optimizer, LR, augmentation): those are refused unless
``TRAIN.RESUME_CONFIG_CHANGE: allow``, so a rerun with an edited config never silently continues the old weights.
Every difference is listed either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from linnaeus.errors import ConfigError

log = logging.getLogger("linnaeus")

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
    "TRAIN.NONFINITE_MAX_SKIPS",
    "DATA.BATCH_SIZE",
    "DATA.BATCH_SIZE_VAL",
    "DATA.NUM_WORKERS",
    "DATA.PIN_MEMORY",
    "DATA.PREFETCH_FACTOR",
    "DATA.DECODE",
    "DATA.HYBRID.IMAGES_DIR",  # the same images moved (the split and labels fingerprint are checked separately)
    "DATA.HYBRID.VERIFY_IMAGES.NUM_WORKERS",  # the other VERIFY_IMAGES keys decide which rows are left out
    "DATA.HYBRID.VERIFY_IMAGES.REPORT_PATH",
    "DATA.SHARDS.DIR",
    "DATA.SHARDS.VERIFY",
    "DATA.H5.LABELS_PATH",  # likewise: a moved labels file is checked by its fingerprint
    "DATA.H5.TRAIN_LABELS_PATH",
    "DATA.H5.VAL_LABELS_PATH",
    "DATA.TAXONOMY_PATH",
    "MODEL.COMPILE",  # speed settings: same weights, same optimizer state layout
    "MODEL.CHANNELS_LAST",
    "OPTIMIZER.FUSED",
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


ABSENT = "(absent)"  # shown for a key of a free-form block that only one config has


def _show(value: Any) -> str:
    if value is _Absent:
        return ABSENT
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


class _Absent:
    """Marks the side of a change where a free-form key does not exist."""


def _in_free_form_block(key: str, other: Mapping[str, Any]) -> bool:
    """Is ``key`` (which the config ``other`` lacks) a user's addition or removal? True inside a block whose keys the
    user chooses (``dict[str, ...]`` in the schema: a loss's or model's PARAMS, timm KWARGS, a whole head of
    MODEL.CLASSIFICATION.HEADS); False for a schema key, which only one version of Linnaeus knows."""
    import types
    import typing

    from pydantic import BaseModel

    from linnaeus.config.defaults import Config

    node: Any = Config
    here: Any = other
    parts = key.split(".")
    i = 0
    while i < len(parts):
        part = parts[i]
        field = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        if field is None:
            return False
        ann = field.annotation
        if typing.get_origin(ann) in (typing.Union, types.UnionType):
            ann = next((a for a in typing.get_args(ann) if a is not type(None)), ann)
        here = here.get(part) if isinstance(here, Mapping) else None
        if typing.get_origin(ann) is dict:
            if i == len(parts) - 1:
                return False
            value = typing.get_args(ann)[1] if len(typing.get_args(ann)) == 2 else Any
            entry = here.get(parts[i + 1]) if isinstance(here, Mapping) else None
            if not (isinstance(value, type) and issubclass(value, BaseModel)) or entry is None:
                return True  # a free-form key, or a whole entry (e.g. a head) only one side has
            node, here, i = value, entry, i + 2
            continue
        node = ann
        i += 1
    return False


def _one_sided(flat: dict[str, Any], missing_from: Mapping[str, Any]) -> list[str]:
    """Keys of ``flat`` that ``missing_from`` lacks and that count as changes (an empty block is no key of its own:
    the other side's keys under it are the change)."""
    return [
        k for k, v in flat.items() if not (isinstance(v, Mapping) and not v) and _in_free_form_block(k, missing_from)
    ]


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[Change]:
    """Keys whose values differ between two resolved configs. A key only one side has is a change inside a
    free-form block (e.g. ``label_smoothing`` removed from a loss's PARAMS) and skipped elsewhere: there, only one
    version of Linnaeus knows it (a newer release adding a key with its default is not a change of the experiment)."""
    old, new = flatten(saved), flatten(current)
    changes = [Change(k, old[k], new[k]) for k in old.keys() & new.keys() if old[k] != new[k]]
    changes += [Change(k, old[k], _Absent) for k in _one_sided({k: old[k] for k in old.keys() - new.keys()}, current)]
    changes += [Change(k, _Absent, new[k]) for k in _one_sided({k: new[k] for k in new.keys() - old.keys()}, saved)]
    return sorted(changes, key=lambda c: c.key)


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
            "resume with the same value, start a new run (another EXPERIMENT.NAME, or delete the run folder to "
            "start it afresh), or set TRAIN.RESUME_CONFIG_CHANGE allow to continue these weights anyway"
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


@dataclass(frozen=True)
class ConfigRecord:
    """What a starting run does with its folder's ``config.yaml``: log ``lines``; write the current config when
    ``write``, first keeping the old one as ``keep_old_as`` (the folder then still describes its whole history)."""

    lines: list[str]
    write: bool
    keep_old_as: str | None = None


def plan_config_record(run: Path, checkpoint: Path | None, current: Mapping[str, Any], allow: bool) -> ConfigRecord:
    """Main process, before heavy work. A fresh start writes its config; a resume compares the current config with
    the one its checkpoint was trained with (the checkpoint's own run folder's ``config.yaml``) and refuses a change
    of meaning unless allowed (ConfigError, one line)."""
    own = run / "config.yaml"
    if checkpoint is None:
        return ConfigRecord([], write=True)
    source = checkpoint.parent.parent / "config.yaml"
    source = source if source.is_file() else own
    if not source.is_file():
        return ConfigRecord([f"resume: no config.yaml beside {checkpoint}; the config cannot be compared"], True)
    lines = check_resume_config(read_saved_config(source), current, allow, source)
    if not own.is_file():
        return ConfigRecord(lines, write=True)
    if not lines:
        return ConfigRecord([], write=False)
    keep, n = f"config.{checkpoint.name}.yaml", 1
    while (run / keep).exists():
        keep, n = f"config.{checkpoint.name}.{n}.yaml", n + 1
    lines.append(f"resume: the config used up to {checkpoint.name} is kept as {run / keep}")
    return ConfigRecord(lines, write=True, keep_old_as=keep)


def write_config_record(record: ConfigRecord, run: Path, text: str) -> None:
    """Main process: apply ``record`` (``text``: the current config as YAML)."""
    from linnaeus.utils.io import atomic_write_text

    if not record.write:
        return
    if record.keep_old_as:
        os.replace(run / "config.yaml", run / record.keep_old_as)
    atomic_write_text(run / "config.yaml", text)


def agree_config_record(
    accelerator: Any, run: Path, current: Mapping[str, Any], allow: bool, find_checkpoint: Callable[[], Path | None]
) -> ConfigRecord:
    """Collective: the main process reads the files and decides, every process logs nothing twice and refuses or
    continues with it (a refusal is raised on every rank, so none waits in a later collective)."""
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            box = [plan_config_record(run, find_checkpoint(), current, allow)]
        except ConfigError as err:
            box = [str(err)]
    broadcast_object_list(box, from_process=0)
    if isinstance(box[0], str):
        raise ConfigError(box[0])
    for line in box[0].lines:
        log.log(logging.WARNING if "allowed by" in line else logging.INFO, "%s", line)
    return box[0]
