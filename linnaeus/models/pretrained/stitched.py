"""``stitched_convnext_ropevit``: mFormerV1 from a ConvNeXt and a RoPE-Mixed ViT checkpoint.

ConvNeXt gives the stem, conv stages 0-1 (depthwise conv, LN, pointwise MLP, LayerScale) and all three
downsamplers (stage transitions 0→1, 1→2, 2→3 have the same widths in both networks). The ViT gives its first
blocks to the attention stage of the same width (LN, qkv, proj, MLP, LayerScale γ₁/γ₂, per-block RoPE-Mixed
frequencies), its CLS token and its final norm (the stage's closing LayerNorm).

RoPE-Mixed stores, per block and head, one (fx, fy) per channel pair: angle = x·fx + y·fy on adjacent channel
pairs, patches in row-major order, prefix tokens unrotated. That is exactly our ``Rope2d`` with ``mixed`` on, so
the frequencies copy over unchanged (the original repository keeps heads flattened: (2, depth, heads·d/2)).

Two layouts are accepted for each file: timm's (``convnext_tiny.*``, ``vit_small_patch16_rope_mixed_224.*``) and
the original repositories' (``convnext_tiny_22k_1k_384.pth``, ``rope_mixed_deit_small_patch16_LS.pth``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from linnaeus.errors import ConfigError
from linnaeus.models.pretrained.files import read_weights
from linnaeus.models.pretrained.report import LoadReport, Transfer
from linnaeus.specs.model import ModelSpec

_TIMM_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
_TIMM_DOWN = re.compile(r"^stages\.(\d+)\.downsample\.([01])\.(.+)$")
_ORIG_BLOCK = re.compile(r"^stages\.(\d+)\.(\d+)\.(.+)$")
_ORIG_DOWN = re.compile(r"^downsample_layers\.(\d+)\.([01])\.(.+)$")
_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TIMM_CONVNEXT_BLOCK_NAMES = {"conv_dw.": "dwconv.", "mlp.fc1.": "pwconv1.", "mlp.fc2.": "pwconv2."}


def _convnext_target(key: str, num_conv_stages: int) -> tuple[str | None, str]:
    """(our backbone name or None, reason when None) for one ConvNeXt key in either layout."""
    if key.startswith("stem."):  # timm: stem.0 conv, stem.1 LN: the same Sequential as ours
        return key, ""
    if m := _ORIG_DOWN.match(key):
        layer, part, rest = int(m[1]), m[2], m[3]
        if layer == 0:  # original stem: downsample_layers.0 = (conv, LN)
            return f"stem.{part}.{rest}", ""
        return f"downsamples.{layer - 1}.{'norm' if part == '0' else 'conv'}.{rest}", ""
    if m := _TIMM_DOWN.match(key):
        return f"downsamples.{int(m[1]) - 1}.{'norm' if m[2] == '0' else 'conv'}.{m[3]}", ""
    m = _TIMM_BLOCK.match(key) or _ORIG_BLOCK.match(key)
    if m:
        stage, block, rest = int(m[1]), int(m[2]), m[3]
        if stage >= num_conv_stages:
            return None, f"no counterpart: ConvNeXt stage {stage} is an attention stage in mFormerV1"
        for theirs, ours in _TIMM_CONVNEXT_BLOCK_NAMES.items():
            if rest.startswith(theirs):
                rest = ours + rest[len(theirs) :]
        return f"conv_stages.{stage}.{block}.{rest}", ""
    return None, "no counterpart: ConvNeXt classifier / final norm"


def _stitch_convnext(transfer: Transfer, sd: dict[str, torch.Tensor], num_conv_stages: int) -> None:
    if "stem.0.weight" not in sd and "downsample_layers.0.0.weight" not in sd:
        raise ConfigError(
            "MODEL.PRETRAINED_CONVNEXT: not a ConvNeXt state dict (expected 'stem.0.weight' (timm) or "
            "'downsample_layers.0.0.weight' (original repository))"
        )
    for key, tensor in sd.items():
        target, reason = _convnext_target(key, num_conv_stages)
        if target is None:
            transfer.skip(key, reason)
        else:
            transfer.assign(f"backbone.{target}", key, tensor)


def _vit_freqs(sd: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor] | None:
    """(key, freqs as (2, depth, heads, head_dim/2)) from either layout, or None when the file has none."""
    if "rope.freqs" in sd:
        return "rope.freqs", sd["rope.freqs"]
    if "freqs" in sd and sd["freqs"].ndim == 3:
        return "freqs", sd["freqs"]  # heads are split below, where the model's head count is known
    return None


def _stitch_ropevit(transfer: Transfer, sd: dict[str, torch.Tensor], backbone: nn.Module) -> None:
    if "blocks.0.attn.qkv.weight" not in sd:
        raise ConfigError(
            "MODEL.PRETRAINED_ROPEVIT: not a ViT state dict with fused qkv (expected 'blocks.0.attn.qkv.weight')"
        )
    width = sd["blocks.0.norm1.weight"].shape[0]
    stages = [s for s, st in enumerate(backbone.attn_stages) if st.cls_token.shape[-1] == width]
    if not stages:
        widths = [st.cls_token.shape[-1] for st in backbone.attn_stages]
        for key in sd:
            transfer.skip(key, f"no counterpart: ViT width {width}, attention stage widths {widths}")
        return
    s = stages[0]
    stage = backbone.attn_stages[s]
    depth = len(stage.blocks)
    heads = stage.blocks[0].attn.num_heads if depth else 0
    prefix = f"backbone.attn_stages.{s}"
    freqs = _vit_freqs(sd)
    for key, tensor in sd.items():
        if m := _VIT_BLOCK.match(key):
            block, rest = int(m[1]), m[2]
            if block >= depth:
                transfer.skip(key, f"no counterpart: attention stage {s} has {depth} blocks")
            else:
                transfer.assign(f"{prefix}.blocks.{block}.{rest}", key, tensor)
        elif key == "cls_token":
            transfer.assign(f"{prefix}.cls_token", key, tensor)
        elif key in ("norm.weight", "norm.bias"):
            transfer.assign(f"{prefix}.{key}", key, tensor)
        elif freqs is not None and key == freqs[0]:
            continue
        elif key.startswith(("freqs_t_", "rope.")):
            transfer.skip(key, "position grid buffer: recomputed from the current grid")
        elif key.startswith("patch_embed."):
            transfer.skip(key, "no counterpart: stage tokens come from the ConvNeXt downsampler")
        elif key == "pos_embed":
            transfer.skip(key, "no counterpart: mFormerV1 has no absolute position embedding (RoPE only)")
        else:
            transfer.skip(key, "no counterpart: ViT classifier / pooling norm")
    if freqs is None:
        return
    key, f = freqs
    if f.ndim == 3:  # original layout (2, depth, heads·d/2)
        f = f.reshape(f.shape[0], f.shape[1], heads, -1) if heads and f.shape[2] % heads == 0 else f[:, :, None]
    for block in range(f.shape[1]):
        where = f"{key}[:, {block}]"
        if block >= depth:
            transfer.skip(where, f"no counterpart: attention stage {s} has {depth} blocks")
            continue
        target = f"{prefix}.blocks.{block}.attn.position.freqs"
        if target not in transfer.targets:
            transfer.skip(
                where,
                "no counterpart: MODEL.ROPE_STAGES.ROPE_MIXED is False (fixed axial frequencies cannot hold "
                "learned mixed ones)",
            )
            continue
        transfer.assign(target, where, f[:, block])


def load_stitched(model: nn.Module, spec: ModelSpec) -> LoadReport:
    if spec.type != "mFormerV1":
        raise ConfigError(
            f"MODEL.PRETRAINED_SOURCE: stitched_convnext_ropevit needs MODEL.TYPE mFormerV1, got {spec.type}"
        )
    files = [(k, p) for k, p in (("MODEL.PRETRAINED_CONVNEXT", spec.pretrained.convnext),
                                  ("MODEL.PRETRAINED_ROPEVIT", spec.pretrained.ropevit)) if p]  # fmt: skip
    if not files:
        raise ConfigError(
            "MODEL.PRETRAINED_CONVNEXT / MODEL.PRETRAINED_ROPEVIT: stitched_convnext_ropevit needs at least one file"
        )
    transfer = Transfer(model)
    backbone = model.backbone
    for key, path in files:
        sd = read_weights(path, key)
        if key == "MODEL.PRETRAINED_CONVNEXT":
            _stitch_convnext(transfer, sd, len(backbone.conv_stages))
        else:
            _stitch_ropevit(transfer, sd, backbone)
    if spec.rope_stages.layer_scale_init_value is None and any(
        k.endswith((".gamma_1", ".gamma_2")) for k, _ in transfer.skipped
    ):
        transfer.notes.append(
            "the ViT's LayerScale (gamma_1/gamma_2) has no target: set MODEL.ROPE_STAGES.LAYER_SCALE_INIT_VALUE "
            "(e.g. 1.0e-5) so the pretrained blocks keep their trained scales"
        )
    return transfer.apply(model, "stitched_convnext_ropevit", [p for _, p in files])
