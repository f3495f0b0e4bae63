"""``linnaeus``: start from a previous Linnaeus model (an ``export/*.safetensors`` file or a bundle folder).

Backbone and metadata embedders load by name. Heads are remapped by taxon id, rank by rank: a class whose taxon
id is in both the old and the new class maps keeps its head row (weight and bias), a new taxon keeps its fresh
initialisation, and dropped taxa are reported. The old class maps come from the bundle's ``class_maps.json`` (or,
for an export file, the run folder's ``class_maps.json`` one level up).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from linnaeus.data.taxonomy import ClassMap
from linnaeus.errors import ConfigError
from linnaeus.models.pretrained.files import read_weights
from linnaeus.models.pretrained.report import LoadReport, Transfer

BUNDLE_WEIGHTS = "weights.safetensors"
CLASS_MAPS = "class_maps.json"
_HEAD = re.compile(r"^head\.heads\.([^.]+)\.fc\.(weight|bias)$")
MAX_LISTED_IDS = 10


def locate(path: str) -> tuple[Path, Path | None]:
    """(weights file, class_maps.json or None) for a bundle folder or an export file."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / BUNDLE_WEIGHTS).is_file():
            raise ConfigError(f"MODEL.PRETRAINED: folder '{path}' is not a Linnaeus bundle (no {BUNDLE_WEIGHTS})")
        return p / BUNDLE_WEIGHTS, p / CLASS_MAPS if (p / CLASS_MAPS).is_file() else None
    for folder in (p.parent, p.parent.parent):
        if (folder / CLASS_MAPS).is_file():
            return p, folder / CLASS_MAPS
    return p, None


def read_taxon_ids(path: Path) -> dict[str, np.ndarray]:
    """Task key → taxon id per class index, from a run's or bundle's class_maps.json."""
    try:
        doc = json.loads(path.read_text())
        return {key: np.asarray([int(c["taxon_id"]) for c in entry["classes"]], np.int64) for key, entry in doc.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"MODEL.PRETRAINED: {path} is not a class_maps.json ({type(err).__name__}: {err})") from None


def _ids(ids: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:MAX_LISTED_IDS])
    return f"[{shown}{', ...' if len(ids) > MAX_LISTED_IDS else ''}]"


def _remap_head(
    transfer: Transfer, key: str, tensor: torch.Tensor, task: str, old: np.ndarray, new: np.ndarray
) -> str | None:
    """Copy the rows of shared taxa into a copy of the model's head tensor; a note for the report (once per task)."""
    target = transfer.targets[key]
    if tensor.shape[0] != len(old) or tensor.shape[1:] != target.shape[1:]:
        transfer.skip(key, f"shape {tuple(tensor.shape)} vs {len(old)} old classes / model {tuple(target.shape)}")
        return None
    shared, new_pos, old_pos = np.intersect1d(new, old, return_indices=True)
    merged = target.detach().clone()
    merged[torch.as_tensor(new_pos)] = tensor[torch.as_tensor(old_pos)].to(merged.dtype)
    if len(shared):
        transfer.assign(key, key, merged)
    else:
        transfer.skip(key, f"{task}: no taxon in both the old and the new class maps")
    if not key.endswith(".weight"):
        return None
    added, dropped = np.setdiff1d(new, old), np.setdiff1d(old, new)
    note = f"{task}: {len(shared)} taxa keep their head rows, {len(added)} new taxa start fresh"
    return note + (f", {len(dropped)} dropped (taxon ids {_ids(dropped)})" if len(dropped) else "")


def load_linnaeus(model: nn.Module, path: str, class_maps: dict[str, ClassMap] | None) -> LoadReport:
    weights, maps_path = locate(path)
    sd = read_weights(str(weights), "MODEL.PRETRAINED")
    old_maps = read_taxon_ids(maps_path) if maps_path is not None else None
    transfer = Transfer(model)
    for key, tensor in sd.items():
        m = _HEAD.match(key)
        if m is None:
            transfer.assign(key, key, tensor)
            continue
        task = m[1]
        if key not in transfer.targets:
            transfer.skip(key, f"no counterpart: task {task} is not configured in this run")
        elif class_maps is None or task not in class_maps:
            transfer.skip(key, "head rows are remapped by taxon id, but this run's class maps were not given")
        elif old_maps is None or task not in old_maps:
            transfer.skip(key, f"no {CLASS_MAPS} for {task} beside {weights} to match taxa by id")
        elif note := _remap_head(transfer, key, tensor, task, old_maps[task], class_maps[task].taxon_ids):
            transfer.notes.append(note)
    return transfer.apply(model, "linnaeus", [str(path)])
