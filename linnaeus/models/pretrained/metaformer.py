"""``metaformer``: mFormerV0 from a MetaFormer / MetaFG checkpoint (dqshuai/MetaFormer; the prior system's V0 kept
the same names, so its checkpoints read the same way).

Names map module by module (stem convs and BNs, MBConv ``_expand_conv/_bn0/_depthwise_conv/_bn1/_se_*/
_project_conv/_bn2``, MHSA blocks, overlapping patch embeddings, CLS tokens, stage norms, ``cl_1_fc``, the 2→1
``aggregate`` and final ``norm``, and the per-component ``meta_<i>_head_<s>`` embedders). A relative-position table
``((2h-1)(2w-1)+1, heads)`` becomes our ``table (heads, 2h-1, 2w-1)`` plus ``extra (heads)``: the original indexes
extra-token pairs with row 0 (see the reference notes), so ``extra`` is row 0 and the patch offsets are the first
(2h-1)(2w-1) rows. A table trained on another grid is resized bicubically to this model's grid.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from linnaeus.errors import ConfigError
from linnaeus.models.pretrained.files import read_weights
from linnaeus.models.pretrained.report import LoadReport, Transfer
from linnaeus.specs.model import ModelSpec

_MBCONV = {
    "_expand_conv.": "expand.0.",
    "_bn0.": "expand.1.",
    "_depthwise_conv.": "dw.0.",
    "_bn1.": "dw.1.",
    "_se_reduce.": "se.reduce.",
    "_se_expand.": "se.expand.",
    "_project_conv.": "project.0.",
    "_bn2.": "project.1.",
}
_META = {"0.": "fc.", "2.": "norm.", "3.w1.": "res.fc1.", "3.norm_fn1.": "res.norm1.", "3.w2.": "res.fc2.",
         "3.norm_fn2.": "res.norm2."}  # fmt: skip
_FIXED = {
    "bn1.": "stem.7.",
    "cls_token_1": "attn_stages.0.cls_token",
    "cls_token_2": "attn_stages.1.cls_token",
    "norm_1.": "attn_stages.0.norm.",
    "norm_2.": "attn_stages.1.norm.",
    "cl_1_fc.0.fc1.": "aggregate.proj1.0.",
    "cl_1_fc.0.fc2.": "aggregate.proj1.2.",
    "cl_1_fc.1.": "aggregate.proj1.3.",
    "aggregate.": "aggregate.mix.",
    "norm.": "aggregate.norm.",
}


def _replace_prefix(rest: str, table: dict[str, str]) -> str | None:
    return next((new + rest[len(old) :] for old, new in table.items() if rest.startswith(old)), None)


def _target(key: str) -> tuple[str | None, str]:
    """(our backbone name, or None with the reason) for one MetaFormer key."""
    if m := re.match(r"^stage_0\.(\d+)\.(.+)$", key):
        return f"stem.{m[1]}.{m[2]}", ""
    if m := re.match(r"^stage_([12])\.(\d+)\.(.+)$", key):
        rest = _replace_prefix(m[3], _MBCONV)
        return (f"conv_stages.{int(m[1]) - 1}.{m[2]}.{rest}", "") if rest else (None, "no counterpart in MBConv")
    if m := re.match(r"^stage_([34])\.(\d+)\.(.+)$", key):
        stage, block, rest = int(m[1]) - 3, m[2], m[3]
        if rest.startswith("patch_embed."):
            return f"patch_embeds.{stage}.{rest.removeprefix('patch_embed.')}", ""
        if rest.endswith("relative_position_index"):
            return None, "index buffer: recomputed from the current grid"
        return f"attn_stages.{stage}.blocks.{block}.{rest}", ""
    if m := re.match(r"^meta_(\d+)_head_([12])\.(.+)$", key):
        rest = _replace_prefix(m[3], _META)
        if rest is None:
            return None, "no counterpart in the metadata embedder"
        return f"attn_stages.{int(m[2]) - 1}.meta_tokens.embedders.{int(m[1]) - 1}.{rest}", ""
    if key.startswith("head"):
        return None, "no counterpart: MetaFormer's classifier (heads here are per rank)"
    mapped = _replace_prefix(key, _FIXED)
    return (mapped, "") if mapped else (None, "no counterpart")


def convert_bias_table(table: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """MetaFormer ``((2h'-1)(2w'-1)+1, heads)`` → (our table (heads, 2h-1, 2w-1), extra (heads)) for ``grid``."""
    rows, heads = table.shape
    side = math.isqrt(rows - 1)
    if side * side != rows - 1:
        raise ValueError(f"{rows} rows is not (2h-1)^2 + 1 for a square grid")
    patch = table[: rows - 1].t().reshape(heads, side, side)
    size = (2 * grid[0] - 1, 2 * grid[1] - 1)
    if (side, side) != size:
        patch = F.interpolate(patch[None].float(), size=size, mode="bicubic", align_corners=False)[0]
    return patch.to(table.dtype), table[0].clone()


def load_metaformer(model: nn.Module, spec: ModelSpec) -> LoadReport:
    if spec.type != "mFormerV0":
        raise ConfigError(f"MODEL.PRETRAINED_SOURCE: metaformer needs MODEL.TYPE mFormerV0, got {spec.type}")
    sd = read_weights(spec.pretrained.path, "MODEL.PRETRAINED")
    if not any(k.startswith("stage_") for k in sd):
        raise ConfigError("MODEL.PRETRAINED: not a MetaFormer state dict (expected keys like 'stage_1.0._bn0.weight')")
    transfer = Transfer(model)
    for key, tensor in sd.items():
        target, reason = _target(key)
        if target is None:
            transfer.skip(key, reason)
        elif target.endswith(".attn.relative_position_bias_table"):
            where = target.removesuffix(".relative_position_bias_table") + ".position"
            position = model.backbone.get_submodule(where) if _has(model.backbone, where) else None
            if position is None:
                transfer.skip(key, f"no counterpart ({where} is not in the model)")
                continue
            try:
                table, extra = convert_bias_table(tensor, position.grid)
            except ValueError as err:
                transfer.skip(key, str(err))
                continue
            if transfer.assign(f"backbone.{where}.table", key, table):
                transfer.assign(f"backbone.{where}.extra", f"{key}[0]", extra)
        else:
            transfer.assign(f"backbone.{target}", key, tensor)
    return transfer.apply(model, "metaformer", [spec.pretrained.path])


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True
