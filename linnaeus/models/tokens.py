"""An attention stage over [CLS, metadata tokens, patches], and the CLS aggregation that ends both backbones."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from linnaeus.models.meta import MetaTokens


class TokenStage(nn.Module):
    """Flatten a feature map, prepend [CLS, one token per metadata component], run the blocks, LayerNorm all tokens.

    Blocks are called as ``block(x, grid, num_extra)`` so each can tell patches (with a position) from extra tokens.
    """

    def __init__(self, dim: int, meta_dims: list[int], blocks: list[nn.Module]) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.meta_tokens = MetaTokens(meta_dims, dim) if meta_dims else None
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.num_extra = 1 + len(meta_dims)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        b, _, h, w = x.shape
        parts = [self.cls_token.expand(b, -1, -1).to(x.dtype)]
        if self.meta_tokens is not None:
            parts.append(self.meta_tokens(meta).to(x.dtype))
        parts.append(x.flatten(2).transpose(1, 2))
        x = torch.cat(parts, dim=1)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, (h, w), self.num_extra, use_reentrant=False)
            else:
                x = block(x, (h, w), self.num_extra)
        return self.norm(x)

    def patches_to_map(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The patch tokens of this stage's output back as a (B, C, H, W) map."""
        b, _, c = tokens.shape
        return tokens[:, self.num_extra :].transpose(1, 2).reshape(b, c, grid[0], grid[1])


class ClsAggregator(nn.Module):
    """Feature = LN(a·proj(CLS₁) + b·CLS₂ + β), or LN(CLS₂) with ``only_last``.

    proj maps the stage-3 CLS to the stage-4 width (Linear → GELU → Linear → LN). (a, b, β) is a 2→1 kernel-1
    Conv1d, started at (0.5, 0.5, 0) so both stages contribute equally at initialisation.
    """

    def __init__(self, dim1: int, dim2: int, only_last: bool = False) -> None:
        super().__init__()
        self.only_last = only_last
        if not only_last:
            # No unused parameters with ONLY_LAST_CLS: DDP would otherwise need find_unused_parameters.
            self.proj1 = nn.Sequential(nn.Linear(dim1, dim1), nn.GELU(), nn.Linear(dim1, dim2), nn.LayerNorm(dim2))
            self.mix = nn.Conv1d(2, 1, kernel_size=1)
        self.norm = nn.LayerNorm(dim2)

    @torch.no_grad()
    def reset_mix(self) -> None:
        if not self.only_last:
            self.mix.weight.fill_(0.5)
            self.mix.bias.zero_()

    def forward(self, cls1: torch.Tensor, cls2: torch.Tensor) -> torch.Tensor:
        if self.only_last:
            return self.norm(cls2)
        stacked = torch.stack((self.proj1(cls1), cls2), dim=1)
        return self.norm(self.mix(stacked).squeeze(1))
