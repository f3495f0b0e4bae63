"""Multi-head self-attention through ``scaled_dot_product_attention`` and the pre-norm transformer block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn


class Attention(nn.Module):
    """MHSA over [extra tokens, patches]; ``position`` (RoPE or relative bias) injects where patches are.

    The softmax scale is d_h^-1/2, given to SDPA explicitly and applied nowhere else, so every kernel SDPA picks
    (flash, memory-efficient, math) computes the same function.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        position: nn.Module | None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.position = position
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_extra: int) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if self.position is not None:
            q, k, bias = self.position(q, k, grid, num_extra)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class TransformerBlock(nn.Module):
    """x + DropPath(γ₁·Attn(LN(x))), then x + DropPath(γ₂·MLP(LN(x))); γ (LayerScale) only with ``layer_scale_init``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        position: nn.Module | None,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
    ) -> None:
        super().__init__()
        self.layer_scale_init = layer_scale_init
        # Named as in DeiT-LS / timm's Eva so RoPE-ViT checkpoints find their LayerScale here.
        self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale_init)) if layer_scale_init else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale_init)) if layer_scale_init else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, position, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_extra: int) -> torch.Tensor:
        y = self.attn(self.norm1(x), grid, num_extra)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)
