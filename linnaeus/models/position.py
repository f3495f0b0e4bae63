"""Position information for attention over [extra tokens, patch grid]: 2-D RoPE (mFormerV1), relative bias (mFormerV0).

Both see a sequence whose first ``num_extra`` tokens (CLS + one per metadata component) have no position. RoPE
leaves them unrotated (angle 0); the relative bias gives every pair involving one of them a single learned value
per head. Both recompute their tables from the current grid, so any input size that is a multiple of 32 works.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def grid_coords(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer (x, y) of each patch in row-major order: token n sits at (n mod W, n div W)."""
    xs = torch.arange(width, device=device, dtype=torch.float32).repeat(height)
    ys = torch.arange(height, device=device, dtype=torch.float32).repeat_interleave(width)
    return xs, ys


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (x[2k], x[2k+1]) of ``x`` (..., N, D) by the angles behind cos/sin (..., N, D/2).

    Computed in (at least) float32 and cast back, so bf16 activations are rotated without losing the angle's precision.
    """
    pairs = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class Rope2d(nn.Module):
    """2-D rotary embedding with per-head frequencies, as a true rotation of q and k.

    Angle of pair k in head h at patch (x, y): x·fx[h, k] + y·fy[h, k]. With ``mixed`` the frequencies are learned
    (RoPE-Mixed: each head starts from base frequencies θ^(-2k/d) pointed along a random direction); otherwise they
    are fixed and axial (first half of the pairs follow x, second half follow y, base θ^(-4k/d)).

    Kept rather than timm's ``RotaryEmbeddingMixed``, although on patch tokens the two agree bit for bit (a test
    checks it): timm's module owns one (2, depth, heads, d/2) ``freqs`` for a whole stack of blocks, where our weights
    hold a (2, heads, d/2) ``attn.position.freqs`` per block (exports and the stitched RoPE-ViT loader rely on
    that); it rotates every token it is given, so the caller would have to split off CLS and metadata tokens; and
    it has no fixed-axial mode (``ROPE_MIXED: false``).
    """

    def __init__(self, num_heads: int, head_dim: int, theta: float = 10000.0, mixed: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.theta, self.mixed = num_heads, head_dim, theta, mixed
        if mixed:
            self.freqs = nn.Parameter(torch.empty(2, num_heads, head_dim // 2))
        else:
            self.register_buffer("freqs", torch.empty(2, num_heads, head_dim // 2), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        half = self.head_dim // 2
        if self.mixed:
            base = self.theta ** (-torch.arange(half, dtype=torch.float32) * 2 / self.head_dim)
            angle = torch.rand(self.num_heads, 1) * 2 * math.pi
            self.freqs.copy_(torch.stack((base * torch.cos(angle), base * torch.sin(angle))))
        else:
            quarter = self.head_dim // 4
            base = self.theta ** (-torch.arange(quarter, dtype=torch.float32) * 4 / self.head_dim)
            zeros = torch.zeros(quarter)
            fx = torch.cat((base, zeros)).expand(self.num_heads, half)
            fy = torch.cat((zeros, base)).expand(self.num_heads, half)
            self.freqs.copy_(torch.stack((fx, fy)))

    def cos_sin(self, height: int, width: int, num_extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables of shape (heads, num_extra + H·W, head_dim/2); extra tokens get angle 0 (identity)."""
        freqs = self.freqs.to(torch.promote_types(self.freqs.dtype, torch.float32))
        xs, ys = (c.to(freqs.dtype) for c in grid_coords(height, width, freqs.device))
        angles = xs[None, :, None] * freqs[0][:, None, :] + ys[None, :, None] * freqs[1][:, None, :]
        angles = F.pad(angles, (0, 0, num_extra, 0))
        return torch.cos(angles), torch.sin(angles)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int], num_extra: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        cos, sin = self.cos_sin(grid[0], grid[1], num_extra)
        return rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin), None

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, theta={self.theta}, mixed={self.mixed}"


class RelativePositionBias(nn.Module):
    """Learned additive attention bias per head for each 2-D offset between patches (MetaFormer / CoAtNet style).

    The table is sized for a reference grid; other grids get a bicubically resized table (the same resize used
    when fine-tuning at a new resolution). Pairs that involve an extra token share one learned value per head,
    kept in its own parameter rather than a conventional table row.
    """

    def __init__(self, num_heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads, self.grid = num_heads, grid
        self.table = nn.Parameter(torch.zeros(num_heads, 2 * grid[0] - 1, 2 * grid[1] - 1))
        self.extra = nn.Parameter(torch.zeros(num_heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        nn.init.trunc_normal_(self.extra, std=0.02)

    def bias(self, height: int, width: int, num_extra: int) -> torch.Tensor:
        """Additive bias (heads, E + H·W, E + H·W)."""
        table = self.table
        if (height, width) != self.grid:
            size = (2 * height - 1, 2 * width - 1)
            table = F.interpolate(table[None], size=size, mode="bicubic", align_corners=False)[0]
        xs, ys = grid_coords(height, width, table.device)
        dx = (xs[:, None] - xs[None, :]).long() + (width - 1)
        dy = (ys[:, None] - ys[None, :]).long() + (height - 1)
        patch = table.flatten(1)[:, dy * (2 * width - 1) + dx]
        n_img = height * width
        extra = self.extra.view(-1, 1, 1)
        top = extra.expand(-1, num_extra, num_extra + n_img)
        left = extra.expand(-1, n_img, num_extra)
        return torch.cat((top, torch.cat((left, patch), dim=2)), dim=1)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int], num_extra: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return q, k, self.bias(grid[0], grid[1], num_extra).to(q.dtype)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, grid={self.grid}"
