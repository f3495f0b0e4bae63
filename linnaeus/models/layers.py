"""What both backbones share beyond timm's layers: the drop-path ramp and the ViT-style init.

Stochastic depth, the channels-first LayerNorm and the MLP are timm's (``timm.layers.DropPath``, ``LayerNorm2d``,
``Mlp``): same parameter names and the same outputs as the hand-written ones they replaced (tests/unit/
test_timm_layers.py keeps those as reference code). Weights use torch's ``nn.init.trunc_normal_`` (a library function
already; timm's draws a different stream from the same seed, which would change every initial weight).
"""

from __future__ import annotations

from torch import nn


def drop_path_rates(rate: float, depths: list[int]) -> list[list[float]]:
    """One linear ramp 0 → ``rate`` over all blocks in order, split per stage (the last block gets ``rate``).

    Not timm's ``calculate_drop_path_rates``: that gives a single block 0 instead of ``rate``.
    """
    total = sum(depths)
    # Plain Python, not torch.linspace: models are also built under a meta-device context for size reports.
    flat = [rate * i / (total - 1) for i in range(total)] if total > 1 else [rate] * total
    out, start = [], 0
    for depth in depths:
        out.append(flat[start : start + depth])
        start += depth
    return out


def init_vit_style(module: nn.Module) -> None:
    """Truncated-normal(0.02) for Linear/Conv2d weights, zero biases, LayerNorm 1/0 (ConvNeXt and DeiT practice)."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
