"""Optimizer parameter groups: decay vs no-decay, backbone vs heads (heads get an LR multiplier), optional layer-wise
LR decay; and freezing the image backbone (frozen parameters are in no group, so they get no optimizer state)."""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The LinnaeusModel under torch.compile (``_orig_mod``) and DDP-style (``module``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def set_backbone_frozen(model: nn.Module, frozen: bool) -> list[str]:
    """Set ``requires_grad = not frozen`` on the backbone's image parameters; returns their names.

    Which parameters count as "image" is the backbone's call (``is_image_parameter``): metadata embedders and the
    timm fusion layer stay trainable, since they never come from an image checkpoint.
    """
    inner = unwrap(model)
    backbone = inner.backbone
    names = []
    for name, param in backbone.named_parameters():
        if backbone.is_image_parameter(name):
            param.requires_grad_(not frozen)
            names.append(f"backbone.{name}")
    return names


def backbone_layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer id per LinnaeusModel parameter name (``backbone.*``; heads excluded) and the number of layers."""
    ids, num_layers = unwrap(model).backbone.layer_ids()
    return {f"backbone.{n}": i for n, i in ids.items()}, num_layers


def param_groups(
    model: nn.Module, weight_decay: float, head_lr_multiplier: float = 1.0, layer_decay: float | None = None
) -> list[dict]:
    """Groups ``{'params', 'weight_decay', 'lr_scale', 'name'}``; empty groups and frozen parameters are left out.

    No decay for 0/1-D parameters (norms, biases, LayerScale) and for names the model lists in
    ``no_weight_decay_names()`` (CLS tokens, RoPE frequencies, relative-bias tables). Parameters under ``head.``
    get ``lr_scale = head_lr_multiplier``; the LR scheduler multiplies each group's LR by its ``lr_scale``.
    With ``layer_decay`` (0 < d <= 1), backbone layer i of L gets ``lr_scale = d ** (L - 1 - i)`` (layer ids from
    the backbone: timm's grouping for timm models, stem/blocks in order for mFormers); heads keep their multiplier.
    """
    inner = unwrap(model)
    skip = inner.no_weight_decay_names() if hasattr(inner, "no_weight_decay_names") else set()
    head_prefix = getattr(inner, "head_prefix", "head.")
    layer_of, num_layers = backbone_layer_ids(inner) if layer_decay is not None else ({}, 1)
    groups: dict[tuple[bool, int, bool], dict] = {}
    for name, param in inner.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name in skip
        is_head = name.startswith(head_prefix)
        layer = num_layers - 1 if is_head else layer_of.get(name, num_layers - 1)
        key = (is_head, layer, no_decay)
        if key not in groups:
            scale = float(head_lr_multiplier) if is_head else 1.0
            if layer_decay is not None and not is_head:
                scale = float(layer_decay) ** (num_layers - 1 - layer)
            where = "head" if is_head else "backbone" if layer_decay is None else f"backbone_layer{layer}"
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else float(weight_decay),
                "lr_scale": scale,
                "name": f"{where}_{'no_decay' if no_decay else 'decay'}",
            }
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]
