"""The shape mFormerV0 and V1 share: two conv stages, two token stages, CLS aggregation; and its input-size rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from linnaeus.models.attention import TransformerBlock
from linnaeus.models.checks import require_len, require_positive, require_stride_multiple
from linnaeus.models.meta import check_meta
from linnaeus.models.tokens import TokenStage
from linnaeus.specs.model import AttentionStagesSpec, ModelSpec, RopeStagesSpec


def attention_stages(
    dims: Sequence[int],
    num_heads: Sequence[int],
    mlp_ratios: Sequence[float],
    drop_paths: Sequence[Sequence[float]],
    meta_dims: list[int],
    position: Callable[[int, int, int], nn.Module],
    **block_kwargs: Any,
) -> nn.ModuleList:
    """The two token stages of a hybrid backbone: stage ``s`` has one pre-norm transformer block per drop-path rate
    in ``drop_paths[s]``, each with its own position module ``position(stage, width, heads)`` (RoPE for V1, a
    relative-bias table for V0)."""
    return nn.ModuleList(
        TokenStage(
            dims[s],
            meta_dims,
            [
                TransformerBlock(
                    dims[s],
                    num_heads[s],
                    mlp_ratios[s],
                    position(s, dims[s], num_heads[s]),
                    drop_path=p,
                    **block_kwargs,
                )
                for p in drop_paths[s]
            ],
        )
        for s in range(2)
    )


def attention_args(stages: AttentionStagesSpec | RopeStagesSpec, key: str) -> dict[str, tuple]:
    """Constructor arguments of the two token stages from a spec with dims, depths, num_heads and mlp_ratio
    (``MODEL.ROPE_STAGES`` for V1, ``MODEL.ATTENTION_STAGES`` for V0, named by ``key``), after the per-field checks."""
    require_positive(f"{key}.DEPTHS", stages.depths, 2, allow_zero=True)
    require_positive(f"{key}.DIMS", stages.dims, 2)
    require_positive(f"{key}.NUM_HEADS", stages.num_heads, 2)
    require_len(f"{key}.MLP_RATIO", stages.mlp_ratio, 2)
    return {
        "attn_dims": tuple(stages.dims[:2]),
        "attn_depths": tuple(stages.depths[:2]),
        "num_heads": tuple(stages.num_heads[:2]),
        "mlp_ratios": tuple(stages.mlp_ratio[:2]),
    }


def shared_args(spec: ModelSpec, meta_dims: list[int]) -> dict[str, Any]:
    """Constructor arguments every hybrid backbone takes the same way from the ``ModelSpec``."""
    return {
        "meta_dims": meta_dims,
        "in_chans": spec.in_chans,
        "drop_path_rate": spec.drop_path_rate,
        "drop_rate": spec.drop_rate,
        "attn_drop_rate": spec.attn_drop_rate,
        "only_last_cls": spec.only_last_cls,
    }


class HybridBackbone(nn.Module):
    """What mFormerV0 and V1 share: two conv stages, then two token stages whose CLS outputs are aggregated.

    Subclasses build ``stem``, ``conv_stages``, ``attn_stages``, ``aggregate`` and provide ``_to_stage3`` (conv map
    after stage 2 → stage-3 input map) and ``_to_stage4`` (stage-3 patch map → stage-4 input map); V1 also
    downsamples between its conv stages (``_between_conv_stages``).
    """

    meta_dims: list[int]
    grad_checkpointing: bool = False
    # Stem /4, then three 2x2 downsamplings (V1) or the equivalent strided conv/patch embeds (V0).
    stride: ClassVar[int] = 32

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

    @classmethod
    def check_img_size(cls, img_size: int) -> None:
        """For ``from_spec``: fail on ``MODEL.IMG_SIZE`` before anything is built."""
        require_stride_multiple("MODEL.IMG_SIZE", img_size, img_size, cls.stride)

    def forward(self, image: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = image.shape
        require_stride_multiple("model input image", h, w, self.stride)
        meta = check_meta(meta, self.meta_dims, b, image)
        x = self._between_conv_stages(self._conv_stage(self.conv_stages[0], self.stem(image)))
        x = self._to_stage3(self._conv_stage(self.conv_stages[1], x))
        grid3 = (x.shape[2], x.shape[3])
        z3 = self.attn_stages[0](x, meta)
        z4 = self.attn_stages[1](self._to_stage4(self.attn_stages[0].patches_to_map(z3, grid3)), meta)
        return self.aggregate(z3[:, 0], z4[:, 0])
