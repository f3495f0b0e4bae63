"""``MODEL.TYPE: timm``: any timm image model as the backbone, fused with our metadata embedding, feeding our heads.

The image feature is timm's own pooled pre-logits feature (``forward_head(forward_features(x), pre_logits=True)``),
so every model pools the way its authors intended (CLS token, average, attention pool). Metadata components are
embedded exactly as in mFormer (one MetaEmbedder per component, at the image feature width) and summed; the sum
is added to (``META_FUSION: add``) or concatenated with (``concat``) the image feature, then one LayerNorm gives
the feature every head reads. Why: see docs/design.md, "Pretrained backbones".

The timm model is always created with ``pretrained=False``; weights come from ``MODEL.PRETRAINED`` (local file).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from linnaeus.errors import ConfigError
from linnaeus.models.meta import MetaTokens, check_meta
from linnaeus.models.registry import register_model
from linnaeus.specs.model import ModelSpec


def create_timm_model(name: str, img_size: int, **kwargs: Any) -> nn.Module:
    """A timm model with random weights and no classifier (``num_classes=0``); ``img_size`` given if it takes one."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"MODEL.TIMM.NAME: '{name}' is not a timm model (see timm.list_models('*pattern*'))")
    probe_kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
    with torch.device("meta"):  # learn the class cheaply, whatever the model's size
        cls = type(timm.create_model(name, pretrained=False, num_classes=0, **probe_kwargs))
    if "img_size" in inspect.signature(cls.__init__).parameters:
        kwargs.setdefault("img_size", img_size)
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as err:
        raise ConfigError(f"MODEL.TIMM.KWARGS: timm model '{name}' rejects these arguments ({err})") from None


class MetaFusion(nn.Module):
    """Pooled image feature (B, W) + metadata (B, Σ DIM) → feature (B, W) [add] or (B, 2W) [concat], LayerNormed."""

    def __init__(self, width: int, meta_dims: list[int], mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.meta_tokens = MetaTokens(meta_dims, width) if meta_dims else None
        self.out_dim = 2 * width if (mode == "concat" and meta_dims) else width
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, image_feature: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        if self.meta_tokens is None:
            return self.norm(image_feature)
        meta_feature = self.meta_tokens(meta).sum(dim=1).to(image_feature.dtype)
        if self.mode == "concat":
            return self.norm(torch.cat((image_feature, meta_feature), dim=1))
        return self.norm(image_feature + meta_feature)


@register_model("timm")
class TimmBackbone(nn.Module):
    """Backbone: ``forward(image, meta) -> feature (B, num_features)``. The timm model lives under ``model.``."""

    image_prefix = "model."

    def __init__(self, model: nn.Module, meta_dims: list[int], fusion: str = "add") -> None:
        super().__init__()
        self.meta_dims = list(meta_dims)
        self.model = model
        width = int(getattr(model, "head_hidden_size", None) or model.num_features)
        # Named `aggregate` like the mFormers': its `norm` is the last layer every head shares (GradNorm's W).
        self.aggregate = MetaFusion(width, self.meta_dims, fusion)
        self.num_features = self.aggregate.out_dim

    @classmethod
    def from_spec(cls, spec: ModelSpec, meta_dims: list[int]) -> TimmBackbone:
        t = spec.timm
        if not t.name:
            raise ConfigError("MODEL.TIMM.NAME: required with MODEL.TYPE timm (a timm model name)")
        kwargs = {"in_chans": spec.in_chans, "drop_rate": spec.drop_rate, "drop_path_rate": spec.drop_path_rate}
        if t.global_pool is not None:
            kwargs["global_pool"] = t.global_pool
        kwargs.update(t.kwargs)
        return cls(create_timm_model(t.name, spec.img_size, **kwargs), meta_dims, t.meta_fusion)

    def forward(self, image: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        meta = check_meta(meta, self.meta_dims, image.shape[0], image)
        pooled = self.model.forward_head(self.model.forward_features(image), pre_logits=True)
        return self.aggregate(pooled, meta)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(enable)

    def no_weight_decay_names(self) -> set[str]:
        names = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"{self.image_prefix}{n}" for n in names}

    def is_image_parameter(self, name: str) -> bool:
        """True for the pretrained image encoder (what FREEZE_BACKBONE freezes), False for metadata and fusion."""
        return name.startswith(self.image_prefix)

    def layer_ids(self) -> tuple[dict[str, int], int]:
        """(parameter name → layer id, number of layers) from timm's own grouping; fusion gets the last layer."""
        from timm.models import group_parameters

        if hasattr(self.model, "group_matcher"):
            mapping = group_parameters(self.model, self.model.group_matcher(coarse=False), reverse=True)
        else:
            from timm.optim._param_groups import auto_group_layers

            mapping = auto_group_layers(self.model)
        num_layers = max(mapping.values(), default=0) + 2
        ids = {f"{self.image_prefix}{n}": i for n, i in mapping.items()}
        for name, _ in self.named_parameters():
            ids.setdefault(name, num_layers - 1)
        return ids, num_layers
