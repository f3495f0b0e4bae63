"""mFormerV0 (MetaFormer-style): conv stem → 2 MBConv stages → 2 relative-bias attention stages → CLS aggregation.

Each attention stage starts with an overlapping 3×3 stride-2 patch embedding, then prepends [CLS, metadata
tokens]. Stride 32 overall. The relative-bias tables are sized for ``MODEL.IMG_SIZE`` and resized on the fly for
other input sizes.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn

from linnaeus.models.checks import require_heads_divide, require_positive
from linnaeus.models.conv import MBConv
from linnaeus.models.hybrid import HybridBackbone, attention_args, attention_stages, shared_args
from linnaeus.models.layers import drop_path_rates
from linnaeus.models.position import RelativePositionBias
from linnaeus.models.registry import register_model
from linnaeus.models.tokens import ClsAggregator
from linnaeus.specs.model import ModelSpec


def _conv_bn_relu(in_dim: int, out_dim: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_dim, out_dim, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out_dim), nn.ReLU()]


class OverlapPatchEmbed(nn.Sequential):
    """3×3 stride-2 conv, then LayerNorm over channels (MetaFormer's in-stage downsampler)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = LayerNorm2d(out_dim, eps=1e-5)  # MetaFormer's: nn.LayerNorm's default, not timm's 1e-6


def _init_v0(module: nn.Module) -> None:
    """MetaFormer's init: trunc-normal Linear, Kaiming (fan-out) convs, unit LayerNorm; BatchNorm keeps defaults."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@register_model("mFormerV0")
class MFormerV0(HybridBackbone):
    """Backbone: ``forward(image, meta) -> feature (B, num_features)``; heads are attached by the builder."""

    def __init__(
        self,
        *,
        stem_dims: tuple[int, int],
        conv_dims: tuple[int, int],
        conv_depths: tuple[int, int],
        attn_dims: tuple[int, int],
        attn_depths: tuple[int, int],
        num_heads: tuple[int, int],
        mlp_ratios: tuple[float, float],
        meta_dims: list[int],
        img_size: int,
        in_chans: int = 3,
        expand_ratio: float = 4.0,
        se_ratio: float = 0.25,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        only_last_cls: bool = False,
    ) -> None:
        super().__init__()
        self.meta_dims = list(meta_dims)
        self.num_features = attn_dims[1]
        # One ramp over MBConv and attention blocks, as in the original MetaFormer.
        dpr = drop_path_rates(drop_path_rate, [*conv_depths, *attn_depths])

        self.stem = nn.Sequential(
            *_conv_bn_relu(in_chans, stem_dims[0], 2),
            *_conv_bn_relu(stem_dims[0], stem_dims[1], 1),
            *_conv_bn_relu(stem_dims[1], stem_dims[1], 1),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        ins = [stem_dims[1], conv_dims[0]]
        self.conv_stages = nn.ModuleList(
            nn.Sequential(
                *(
                    MBConv(
                        ins[s] if i == 0 else conv_dims[s],
                        conv_dims[s],
                        stride=2 if (s == 0 and i == 0) else 1,
                        expand_ratio=expand_ratio,
                        se_ratio=se_ratio,
                        drop_path=p,
                    )
                    for i, p in enumerate(dpr[s])
                )
            )
            for s in range(2)
        )
        embed_in = [conv_dims[1], attn_dims[0]]
        self.patch_embeds = nn.ModuleList(OverlapPatchEmbed(embed_in[s], attn_dims[s]) for s in range(2))
        grids = [(img_size // 16, img_size // 16), (img_size // 32, img_size // 32)]

        self.attn_stages = attention_stages(
            attn_dims,
            num_heads,
            mlp_ratios,
            dpr[2:],
            self.meta_dims,
            lambda s, dim, heads: RelativePositionBias(heads, grids[s]),
            qkv_bias=False,
            drop=drop_rate,
            attn_drop=attn_drop_rate,
        )
        self.aggregate = ClsAggregator(attn_dims[0], attn_dims[1], only_last_cls)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(_init_v0)
        for stage in self.attn_stages:
            nn.init.trunc_normal_(stage.cls_token, std=0.02)
        self.aggregate.reset_mix()

    @classmethod
    def from_spec(cls, spec: ModelSpec, meta_dims: list[int]) -> MFormerV0:
        conv, attn = spec.conv_stages, spec.attention_stages
        require_positive("MODEL.CONV_STAGES.STEM_DIMS", conv.stem_dims, 2)
        require_positive("MODEL.CONV_STAGES.OUT_CHANNELS", conv.out_channels, 2)
        # The first block of stage 1 carries the /8 stride, so it must exist.
        require_positive("MODEL.CONV_STAGES.DEPTHS", conv.depths, 2)
        attention = attention_args(attn, "MODEL.ATTENTION_STAGES")
        require_heads_divide("MODEL.ATTENTION_STAGES.DIMS", attn.dims[:2], attn.num_heads[:2], 1)
        cls.check_img_size(spec.img_size)
        return cls(
            stem_dims=(conv.stem_dims[0], conv.stem_dims[1]),
            conv_dims=(conv.out_channels[0], conv.out_channels[1]),
            conv_depths=(conv.depths[0], conv.depths[1]),
            **attention,
            img_size=spec.img_size,
            expand_ratio=conv.expand_ratio,
            se_ratio=conv.se_ratio,
            **shared_args(spec, meta_dims),
        )

    def no_weight_decay_names(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(("cls_token", ".table", ".extra"))}

    # Note: with gradient checkpointing, recomputing an MBConv block updates its BatchNorm running stats twice.

    def _to_stage3(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embeds[0](x)

    def _to_stage4(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embeds[1](x)
