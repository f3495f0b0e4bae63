"""``linnaeus check``: the data report from ``linnaeus.data.check`` plus sections that need the model or shards
(which the data package must not import)."""

from __future__ import annotations

import argparse
import itertools
from typing import Any

from linnaeus.config import Config

SIZE_RESOLUTIONS = (224, 384)


def _any_tree(parents: int, children: int):
    import torch

    h = torch.zeros(parents, children)
    h[torch.arange(children) % parents, torch.arange(children)] = 1.0
    return h


def model_section(cfg: Config, num_classes: dict[str, int]) -> dict[str, Any]:
    """Measured (not documented) size: parameters, and GMACs at 224 and 384 px for one image."""
    import torch

    from linnaeus.data.labels import components_from_config
    from linnaeus.models import HierarchicalClassifier, build_backbone, coarse_to_fine, model_size
    from linnaeus.models.builder import resolve_head_configs

    meta_dims = [c.dim for c in components_from_config(cfg)]
    keys = list(cfg.DATA.TASK_KEYS_H5)
    order = coarse_to_fine(keys)
    # Which parent each child has does not change the size; any valid tree of the right shape will do.
    shapes = {(p, c): _any_tree(num_classes[p], num_classes[c]) for p, c in itertools.pairwise(order)}
    with torch.device("meta"):  # the backbone can be large; count it without allocating memory
        num_features = build_backbone(cfg.MODEL, meta_dims).num_features
    heads = HierarchicalClassifier(
        num_features, keys, num_classes, resolve_head_configs(cfg.MODEL, keys, num_classes), shapes
    )
    head_params = sum(p.numel() for p in heads.parameters())
    sizes = {px: model_size(cfg.MODEL, meta_dims, px) for px in (*SIZE_RESOLUTIONS, cfg.MODEL.IMG_SIZE)}
    backbone = sizes[SIZE_RESOLUTIONS[0]]
    return {
        "name": cfg.MODEL.NAME,
        "params": backbone["params"] + head_params,
        "backbone_params": backbone["params"],
        "meta_params": backbone["meta_params"],
        "head_params": head_params,
        "gmacs": {str(px): round(s["gmacs"], 3) for px, s in sorted(sizes.items())},
    }


def shards_section(cfg: Config, num_classes: dict[str, int]) -> dict[str, Any] | None:
    if not cfg.DATA.SHARDS.ENABLED:
        return None
    from linnaeus.data.shards import shard_report

    return shard_report(cfg)


def losses_section(cfg: Config, num_classes: dict[str, int]) -> dict[str, Any]:
    """Each head's loss, with its PARAMS validated by the same code training uses."""
    from linnaeus.losses.task_loss import loss_config_problems

    heads = cfg.MODEL.CLASSIFICATION.HEADS
    types = {k: heads[k].LOSS.TYPE if k in heads else "CrossEntropyLoss" for k in cfg.DATA.TASK_KEYS_H5}
    return {"types": types, "errors": loss_config_problems(cfg)}


def run(args: argparse.Namespace) -> int:
    from linnaeus.data.check import run as run_data_check

    return run_data_check(args, extra={"losses": losses_section, "model": model_section, "shards": shards_section})
