"""Small building blocks shared by both backbones: stochastic depth, channels-first LayerNorm, MLP, init."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def drop_path_rates(rate: float, depths: list[int]) -> list[list[float]]:
    """One linear ramp 0 → ``rate`` over all blocks in order, split per stage (the last block gets ``rate``)."""
    total = sum(depths)
    # Plain Python, not torch.linspace: models are also built under a meta-device context for size reports.
    flat = [rate * i / (total - 1) for i in range(total)] if total > 1 else [rate] * total
    out, start = [], 0
    for depth in depths:
        out.append(flat[start : start + depth])
        start += depth
    return out


class DropPath(nn.Module):
    """Per-sample stochastic depth: drop the residual branch with probability ``p``, rescale survivors by 1/(1-p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW map (ConvNeXt's channels-first norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    """Linear → GELU → dropout → Linear → dropout."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


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
