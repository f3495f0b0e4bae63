"""Convolutional blocks: ConvNeXt block and downsampler (mFormerV1), MBConv with squeeze-excite (mFormerV0)."""

from __future__ import annotations

import torch
from timm.layers import DropPath, LayerNorm2d
from torch import nn


class ConvNeXtBlock(nn.Module):
    """dw7×7 → LN → Linear(4d) → GELU → Linear(d) → LayerScale, added to the input through DropPath."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale_init = layer_scale_init
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init)) if layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class Downsample(nn.Sequential):
    """ConvNeXt-style stage transition: channels-first LN, then a 2×2 stride-2 conv."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(in_dim, eps=1e-6)
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)


class SqueezeExcite(nn.Module):
    """Global pool → 1×1 reduce → SiLU → 1×1 expand → sigmoid gate."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(self.act(self.reduce(s))))


def _bn(channels: int) -> nn.BatchNorm2d:
    # MetaFormer's MBConv settings, kept so its checkpoints behave the same here.
    return nn.BatchNorm2d(channels, momentum=0.1, eps=1e-2)


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand → BN → SiLU → dw3×3 (stride) → BN → SiLU → SE → 1×1 project → BN.

    The residual (with DropPath) is used only when the block keeps shape. Padding is symmetric, so any even
    input size works (the prior system's static "same" padding was tied to one image size).
    """

    def __init__(
        self, in_dim: int, out_dim: int, stride: int, expand_ratio: float, se_ratio: float, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        hidden = round(in_dim * expand_ratio)
        self.expand = nn.Sequential(nn.Conv2d(in_dim, hidden, 1, bias=False), _bn(hidden), nn.SiLU())
        self.dw = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False), _bn(hidden), nn.SiLU()
        )
        reduced = max(1, int(in_dim * se_ratio))
        self.se = SqueezeExcite(hidden, reduced) if se_ratio > 0 else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(hidden, out_dim, 1, bias=False), _bn(out_dim))
        self.use_residual = stride == 1 and in_dim == out_dim
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + self.drop_path(y) if self.use_residual else y
