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


class HybridBackbone(nn.Module):
    """What mFormerV0 and V1 share: two conv stages, then two token stages whose CLS outputs are aggregated.

    Subclasses build ``stem``, ``conv_stages``, ``attn_stages``, ``aggregate`` and provide ``_to_stage3`` (conv map
    after stage 2 → stage-3 input map) and ``_to_stage4`` (stage-3 patch map → stage-4 input map); V1 also
    downsamples between its conv stages (``_between_conv_stages``).
    """

    meta_dims: list[int]
    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.attn_stages:
            stage.grad_checkpointing = enable

    def is_image_parameter(self, name: str) -> bool:
        """True for image-path parameters (what FREEZE_BACKBONE freezes); metadata embedders stay trainable."""
        return ".meta_tokens." not in name

    def layer_ids(self) -> tuple[dict[str, int], int]:
        """(parameter name → layer id, number of layers) for layer-wise LR decay, ConvNeXt/BEiT style.

        Stem = 0, then one id per block in forward order (conv blocks, then attention blocks); a downsampler or
        patch embedding joins the first block after it, a stage's CLS/metadata tokens its first block, a stage's
        final norm its last block; the CLS aggregation gets the last id (like the heads).
        """
        prefixes: list[str] = ["stem."]
        joins: dict[str, int] = {}
        for s, stage in enumerate(self.conv_stages):
            if s > 0:
                joins[f"downsamples.{s - 1}."] = len(prefixes)
            prefixes += [f"conv_stages.{s}.{b}." for b in range(len(stage))]
        for s, stage in enumerate(self.attn_stages):
            first = len(prefixes)
            joins[f"downsamples.{s + len(self.conv_stages) - 1}."] = first
            joins[f"patch_embeds.{s}."] = first
            joins[f"attn_stages.{s}.cls_token"] = first
            joins[f"attn_stages.{s}.meta_tokens."] = first
            prefixes += [f"attn_stages.{s}.blocks.{b}." for b in range(len(stage.blocks))]
            joins[f"attn_stages.{s}.norm."] = len(prefixes) - 1
        num_layers = len(prefixes) + 1
        ids = {}
        for name, _ in self.named_parameters():
            layer = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
            if layer is None:
                layer = next((i for p, i in joins.items() if name.startswith(p)), num_layers - 1)
            ids[name] = layer
        return ids, num_layers

    def _conv_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for block in stage:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def _between_conv_stages(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _to_stage3(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _to_stage4(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, image: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        from linnaeus.errors import ConfigError
        from linnaeus.models.meta import check_meta

        b, _, h, w = image.shape
        if h % 32 or w % 32:
            raise ConfigError(f"model input image is {h}x{w}; expected height and width that are multiples of 32")
        meta = check_meta(meta, self.meta_dims, b, image)
        x = self._between_conv_stages(self._conv_stage(self.conv_stages[0], self.stem(image)))
        x = self._to_stage3(self._conv_stage(self.conv_stages[1], x))
        grid3 = (x.shape[2], x.shape[3])
        z3 = self.attn_stages[0](x, meta)
        z4 = self.attn_stages[1](self._to_stage4(self.attn_stages[0].patches_to_map(z3, grid3)), meta)
        return self.aggregate(z3[:, 0], z4[:, 0])
