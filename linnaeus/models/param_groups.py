"""Optimizer parameter groups: decay vs no-decay, backbone vs heads (heads get an LR multiplier)."""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The LinnaeusModel under torch.compile (``_orig_mod``) and DDP-style (``module``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def param_groups(model: nn.Module, weight_decay: float, head_lr_multiplier: float = 1.0) -> list[dict]:
    """Up to four groups, each ``{'params', 'weight_decay', 'lr_scale', 'name'}``; empty groups are left out.

    No decay for 0/1-D parameters (norms, biases, LayerScale) and for names the model lists in
    ``no_weight_decay_names()`` (CLS tokens, RoPE frequencies, relative-bias tables). Parameters under ``head.``
    get ``lr_scale = head_lr_multiplier``; the LR scheduler multiplies each group's LR by its ``lr_scale``.
    """
    inner = unwrap(model)
    skip = inner.no_weight_decay_names() if hasattr(inner, "no_weight_decay_names") else set()
    head_prefix = getattr(inner, "head_prefix", "head.")
    groups: dict[tuple[bool, bool], dict] = {}
    for name, param in inner.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name in skip
        is_head = name.startswith(head_prefix)
        key = (is_head, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else float(weight_decay),
                "lr_scale": float(head_lr_multiplier) if is_head else 1.0,
                "name": f"{'head' if is_head else 'backbone'}_{'no_decay' if no_decay else 'decay'}",
            }
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]
