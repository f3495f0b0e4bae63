"""Metadata components → one token each, prepended (after CLS) to an attention stage's sequence.

Each attention stage owns its own embedders (no sharing between stages). A missing or masked component arrives
as an all-zero slice, so its token is the embedder's output at 0: a learned "missing" vector, no special case.
"""

from __future__ import annotations

import torch
from torch import nn

from linnaeus.errors import ConfigError


class ResNorm(nn.Module):
    """x + LN(ReLU(W2 · LN(ReLU(W1 x + b1)) + b2))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.fc2 = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm2(self.act(self.fc2(self.norm1(self.act(self.fc1(x))))))


class MetaEmbedder(nn.Module):
    """One component (DIM values) → one token: Linear → ReLU → LN → ResNorm (MetaFormer's embedder)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, dim)
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(dim)
        self.res = ResNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(self.norm(self.act(self.fc(x))))


class MetaTokens(nn.Module):
    """All components of the packed metadata vector → (B, num_components, dim), in IDX order."""

    def __init__(self, meta_dims: list[int], dim: int) -> None:
        super().__init__()
        self.meta_dims = list(meta_dims)
        self.embedders = nn.ModuleList(MetaEmbedder(d, dim) for d in self.meta_dims)

    def __len__(self) -> int:
        return len(self.meta_dims)

    def forward(self, meta: torch.Tensor) -> torch.Tensor:
        parts = meta.split(self.meta_dims, dim=1)
        return torch.stack([embed(part) for embed, part in zip(self.embedders, parts, strict=True)], dim=1)


def check_meta(meta: torch.Tensor | None, meta_dims: list[int], batch: int, like: torch.Tensor) -> torch.Tensor | None:
    """Validate the model's ``meta`` input; ``None`` with components configured means "all missing" (zeros)."""
    total = sum(meta_dims)
    if not meta_dims:
        if meta is not None and meta.shape[-1] != 0:
            raise ConfigError(
                f"model input 'meta' has {meta.shape[-1]} columns but the model was built without metadata "
                "components (DATA.META.ACTIVE / DATA.META.COMPONENTS)"
            )
        return None
    if meta is None:
        return like.new_zeros(batch, total)
    if meta.ndim != 2 or meta.shape[0] != batch or meta.shape[1] != total:
        raise ConfigError(
            f"model input 'meta' has shape {tuple(meta.shape)}; expected ({batch}, {total}) = the enabled "
            f"DATA.META.COMPONENTS DIMs {meta_dims} summed"
        )
    return meta.to(like.dtype)
