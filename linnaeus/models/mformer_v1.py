"""mFormerV1: patchify stem → 2 ConvNeXt stages → 2 RoPE attention stages with CLS + metadata tokens → CLS aggregation.

Stride 32 in total (stem 4, then three LN + 2×2 downsamplers), so any input size that is a multiple of 32 works.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn

from linnaeus.errors import ConfigError
from linnaeus.models.attention import TransformerBlock
from linnaeus.models.checks import require_heads_divide, require_positive
from linnaeus.models.conv import ConvNeXtBlock, Downsample
from linnaeus.models.hybrid import HybridBackbone, attention_args, attention_stages, shared_args
from linnaeus.models.layers import drop_path_rates, init_vit_style
from linnaeus.models.position import Rope2d
from linnaeus.models.registry import register_model
from linnaeus.models.tokens import ClsAggregator
from linnaeus.specs.model import ModelSpec


@register_model("mFormerV1")
class MFormerV1(HybridBackbone):
    """Backbone: ``forward(image, meta) -> feature (B, num_features)``; heads are attached by the builder."""

    def __init__(
        self,
        *,
        conv_dims: tuple[int, int],
        conv_depths: tuple[int, int],
        attn_dims: tuple[int, int],
        attn_depths: tuple[int, int],
        num_heads: tuple[int, int],
        mlp_ratios: tuple[float, float],
        meta_dims: list[int],
        in_chans: int = 3,
        rope_theta: float = 10000.0,
        rope_mixed: bool = True,
        layer_scale_init: float = 1e-6,
        attn_layer_scale_init: float | None = None,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        only_last_cls: bool = False,
    ) -> None:
        super().__init__()
        self.meta_dims = list(meta_dims)
        self.num_features = attn_dims[1]
        dpr = drop_path_rates(drop_path_rate, [*conv_depths, *attn_depths])

        self.stem = nn.Sequential(nn.Conv2d(in_chans, conv_dims[0], 4, stride=4), LayerNorm2d(conv_dims[0], eps=1e-6))
        self.conv_stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(conv_dims[i], p, layer_scale_init) for p in dpr[i])) for i in range(2)
        )
        widths = [*conv_dims, *attn_dims]
        self.downsamples = nn.ModuleList(Downsample(widths[i], widths[i + 1]) for i in range(3))

        self.attn_stages = attention_stages(
            attn_dims,
            num_heads,
            mlp_ratios,
            dpr[2:],
            self.meta_dims,
            lambda s, dim, heads: Rope2d(heads, dim // heads, rope_theta, rope_mixed),
            qkv_bias=True,
            drop=drop_rate,
            attn_drop=attn_drop_rate,
            layer_scale_init=attn_layer_scale_init,
        )
        self.aggregate = ClsAggregator(attn_dims[0], attn_dims[1], only_last_cls)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_vit_style)
        for stage in self.attn_stages:
            nn.init.trunc_normal_(stage.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, ConvNeXtBlock) and module.gamma is not None:
                nn.init.constant_(module.gamma, module.layer_scale_init)
            if isinstance(module, TransformerBlock) and module.gamma_1 is not None:
                nn.init.constant_(module.gamma_1, module.layer_scale_init)
                nn.init.constant_(module.gamma_2, module.layer_scale_init)
        self.aggregate.reset_mix()

    @classmethod
    def from_spec(cls, spec: ModelSpec, meta_dims: list[int]) -> MFormerV1:
        conv, rope = spec.convnext_stages, spec.rope_stages
        cls.check_img_size(spec.img_size)
        require_positive("MODEL.CONVNEXT_STAGES.DEPTHS", conv.depths, 2, allow_zero=True)
        require_positive("MODEL.CONVNEXT_STAGES.DIMS", conv.dims, 4)
        attention = attention_args(rope, "MODEL.ROPE_STAGES")
        for i in range(2):
            if rope.dims[i] != conv.dims[i + 2]:
                raise ConfigError(
                    f"MODEL.ROPE_STAGES.DIMS: expected DIMS[{i}] == MODEL.CONVNEXT_STAGES.DIMS[{i + 2}] "
                    f"({conv.dims[i + 2]}), got {rope.dims[i]}"
                )
        require_heads_divide("MODEL.ROPE_STAGES.DIMS", rope.dims[:2], rope.num_heads[:2], 2 if rope.rope_mixed else 4)
        return cls(
            conv_dims=(conv.dims[0], conv.dims[1]),
            conv_depths=(conv.depths[0], conv.depths[1]),
            **attention,
            rope_theta=rope.rope_theta,
            rope_mixed=rope.rope_mixed,
            layer_scale_init=conv.layer_scale_init_value,
            attn_layer_scale_init=rope.layer_scale_init_value,
            **shared_args(spec, meta_dims),
        )

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names (relative to this module) that must not be decayed besides norms and biases."""
        return {
            n
            for n, _ in self.named_parameters()
            if n.endswith(("cls_token", ".freqs", ".gamma", ".gamma_1", ".gamma_2"))
        }

    def _between_conv_stages(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsamples[0](x)

    def _to_stage3(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsamples[1](x)

    def _to_stage4(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsamples[2](x)
