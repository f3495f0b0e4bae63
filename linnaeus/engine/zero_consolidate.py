"""Whole fp32 weights from a DeepSpeed ZeRO-1/2/3 checkpoint folder, read with ``weights_only=True``.

DeepSpeed's own ``zero_to_fp32`` unpickles with ``weights_only=False``; this is the same reconstruction over files
loaded by ``safe_files.safe_load``. Layout (``<ckpt>/pytorch_model/``):

- ``*_model_states.pt`` (one for ZeRO-1/2, one per rank for ZeRO-3): ``module`` (buffers live here),
  ``buffer_names``, ``param_shapes`` (one ``{name: shape}`` per optimizer group), ``frozen_param_shapes`` /
  ``frozen_param_fragments`` and ``shared_params`` (``{alias: source}``).
- ``*_optim_states.pt`` (one per rank): ``optimizer_state_dict`` holds each rank's slice of the fp32 master weights:
  ZeRO-1/2 ``single_partition_of_fp32_groups`` (per group, ranks' slices are consecutive; optional
  ``param_alignment_paddings`` between parameters), ZeRO-3 ``fp32_flat_groups`` (every parameter is split into
  ``ceil(numel / world)`` elements per rank, padded at the end).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from linnaeus.engine.safe_files import safe_load
from linnaeus.errors import DataError


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _files(ds_dir: Path, pattern: str) -> list[Path]:
    found = sorted(ds_dir.glob(pattern), key=_natural)
    if not found:
        raise DataError(f"{ds_dir}: no {pattern} files; not a complete DeepSpeed checkpoint")
    return found


def _get(d: Any, key: str, where: Path) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise DataError(f"{where}: '{key}' is missing; not a DeepSpeed checkpoint file this version can read")
    return d[key]


def zero_state_dict(ds_dir: Path) -> dict[str, torch.Tensor]:
    ds_dir = Path(ds_dir)
    model_files = _files(ds_dir, "*_model_states.pt")
    optim_files = _files(ds_dir, "*_optim_states.pt")
    model_states = [safe_load(f) for f in model_files]
    first = model_states[0]
    optim = [_get(safe_load(f), "optimizer_state_dict", f) for f in optim_files]
    world = _get(optim[0], "partition_count", optim_files[0])
    world = max(world) if isinstance(world, list | tuple) else int(world)
    if world != len(optim_files):
        raise DataError(f"{ds_dir}: written by {world} processes but holds {len(optim_files)} optimizer shards")

    buffer_names = set(_get(first, "buffer_names", model_files[0]))
    module = _get(first, "module", model_files[0])
    sd: dict[str, torch.Tensor] = {k: v for k, v in module.items() if k in buffer_names}
    param_shapes = _get(first, "param_shapes", model_files[0])
    frozen = first.get("frozen_param_shapes") or {}

    if "fp32_flat_groups" in optim[0]:
        for name, shape in frozen.items():
            numel = math.prod(shape)
            parts = [_get(m.get("frozen_param_fragments") or {}, name, ds_dir) for m in model_states]
            sd[name] = torch.cat([p.reshape(-1) for p in parts])[:numel].view(shape)
        _zero3(sd, [_get(o, "fp32_flat_groups", ds_dir) for o in optim], param_shapes, world, ds_dir)
    else:
        for name in frozen:
            sd[name] = _get(first.get("frozen_param_fragments") or {}, name, ds_dir)
        paddings = optim[0].get("param_alignment_paddings")
        _zero12(
            sd,
            [_get(o, "single_partition_of_fp32_groups", ds_dir) for o in optim],
            param_shapes,
            paddings,
            world,
            ds_dir,
        )
    for alias, source in (first.get("shared_params") or {}).items():
        if source in sd:
            sd[alias] = sd[source]
    return sd


def _zero12(sd, flat_groups, param_shapes, paddings, world: int, where: Path) -> None:
    if len(flat_groups[0]) != len(param_shapes):
        raise DataError(f"{where}: {len(param_shapes)} parameter groups but {len(flat_groups[0])} weight groups")
    align = 2 * world  # DeepSpeed pads each group's flat buffer to a multiple of this
    for g, shapes in enumerate(param_shapes):
        full = torch.cat([rank_groups[g].reshape(-1) for rank_groups in flat_groups])
        group_pad = paddings[g] if paddings is not None else None
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            if offset + numel > full.numel():
                raise DataError(f"{where}: parameter {name} lies past the end of the saved weights")
            sd[name] = full.narrow(0, offset, numel).view(tuple(shape)).clone()
            offset += numel + (group_pad[i] if group_pad is not None else 0)
        if align * math.ceil(offset / align) != align * math.ceil(full.numel() / align):
            raise DataError(f"{where}: group {g} holds {full.numel()} weights but its parameters need {offset}")


def _zero3(sd, flat_groups, param_shapes, world: int, where: Path) -> None:
    flats = [torch.cat([t.reshape(-1) for t in rank_groups]) for rank_groups in flat_groups]
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            per_rank = math.ceil(numel / world)
            if offset + per_rank > flats[0].numel():
                raise DataError(f"{where}: parameter {name} lies past the end of the saved weights")
            parts = [flat.narrow(0, offset, per_rank) for flat in flats]
            sd[name] = torch.cat(parts)[:numel].view(tuple(shape)).clone()
            offset += per_rank
    if offset != flats[0].numel():
        raise DataError(f"{where}: each rank holds {flats[0].numel()} weights but the parameters need {offset}")
