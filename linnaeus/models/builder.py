"""Build a backbone from ``MODEL.TYPE`` and attach one head per task key: the one nn.Module the engine trains."""

from __future__ import annotations

import torch
from torch import nn

# Imported for their registration side effect.
import linnaeus.models.mformer_v0
import linnaeus.models.mformer_v1
import linnaeus.models.timm_backbone  # noqa: F401
from linnaeus.data.taxonomy import ClassMap
from linnaeus.errors import ConfigError
from linnaeus.models.heads import HierarchicalClassifier, rank_level
from linnaeus.models.param_groups import set_backbone_frozen
from linnaeus.models.pretrained import LoadReport, apply_pretrained, require_pretrained_files
from linnaeus.models.registry import get_model_class
from linnaeus.models.view_pooling import ViewPooling, pooled_features
from linnaeus.specs.model import HeadSpec, ModelSpec


class LinnaeusModel(nn.Module):
    """Backbone + heads. ``forward(image (B,3,H,W), meta (B,D) | None) -> {task_key: logits (B, K_task)}``; a
    multi-view model also takes ``view_mask`` (B, K) with ``image`` (B·K, 3, H, W) (see ``add_view_pooling``)."""

    head_prefix = "head."

    def __init__(self, backbone: nn.Module, head: HierarchicalClassifier, pooling: ViewPooling | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        # Multi-view models (DATA.OBSERVATIONS): an observation's per-view features are pooled before the heads.
        self.pooling = pooling
        # What MODEL.PRETRAINED gave this model (None: nothing loaded); the trainer logs it at start.
        self.pretrained_report: LoadReport | None = None

    @property
    def task_keys(self) -> list[str]:
        return self.head.task_keys

    @property
    def meta_dims(self) -> list[int]:
        return self.backbone.meta_dims

    def forward_features(
        self, image: torch.Tensor, meta: torch.Tensor | None = None, view_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image features (B, D); with ``view_mask`` (B, K), ``image`` holds B·K views and their features are
        pooled per observation (``linnaeus.models.view_pooling``)."""
        if view_mask is None:
            return self.backbone(image, meta)
        if self.pooling is None:
            raise ValueError("this model has no view pooling (it was not built for DATA.OBSERVATIONS)")
        return pooled_features(self.backbone, image, meta, view_mask, self.pooling)

    def forward(
        self, image: torch.Tensor, meta: torch.Tensor | None = None, view_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return self.head(self.forward_features(image, meta, view_mask))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay_names(self) -> set[str]:
        """Names (besides any 0/1-D parameter: norms, biases, LayerScale) to leave out of weight decay."""
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay_names()}

    def gradnorm_shared_parameters(self) -> list[nn.Parameter]:
        """The last layer shared by every head (the feature LayerNorm): GradNorm's W, as in Chen et al. 2018."""
        return list(self.backbone.aggregate.norm.parameters())


def resolve_head_specs(spec: ModelSpec, task_keys: list[str], num_classes: dict[str, int]) -> dict[str, HeadSpec]:
    """One HeadSpec per task key (LinearHead defaults when ``HEADS`` is empty), checked against the labels."""
    heads = spec.heads
    if not task_keys:
        raise ConfigError("DATA.TASK_KEYS_H5: expected at least one task key, got []")
    for key in task_keys:
        rank_level(key)
        if key not in num_classes:
            raise ConfigError(f"DATA.TASK_KEYS_H5: no class count for '{key}' (have {sorted(num_classes)})")
    if not heads:
        return {key: HeadSpec() for key in task_keys}
    for key in task_keys:
        if key not in heads:
            raise ConfigError(f"MODEL.CLASSIFICATION.HEADS: no head for task '{key}' (heads defined: {sorted(heads)})")
    for key in heads:
        if key not in task_keys:
            raise ConfigError(
                f"MODEL.CLASSIFICATION.HEADS.{key}: head for '{key}', which is not a task key {task_keys}"
            )
    for key in task_keys:
        declared = heads[key].num_classes
        if declared is not None and declared != num_classes[key]:
            raise ConfigError(
                f"MODEL.CLASSIFICATION.HEADS.{key}.NUM_CLASSES: {declared} disagrees with the {num_classes[key]} "
                "classes found in the labels"
            )
    return {key: heads[key] for key in task_keys}


def build_backbone(spec: ModelSpec, meta_dims: list[int]) -> nn.Module:
    """The backbone ``MODEL.TYPE`` names: its class's ``from_spec(spec, meta_dims)``."""
    for i, dim in enumerate(meta_dims):
        if dim < 1:
            raise ConfigError(f"DATA.META.COMPONENTS: component {i} (IDX order) has DIM {dim}; expected >= 1")
    cls = get_model_class(spec.type)
    if not hasattr(cls, "from_spec"):
        # A model written for the extension API before specs (a from_config reading the MODEL section): say so.
        raise ConfigError(
            f"MODEL.TYPE: {spec.type} ({cls.__module__}.{cls.__qualname__}) has no classmethod from_spec(spec, "
            "meta_dims); models are built from a linnaeus.specs.model.ModelSpec (docs/design.md, Extending Linnaeus)"
        )
    return cls.from_spec(spec, list(meta_dims))


def build_model(
    spec: ModelSpec,
    task_keys: list[str],
    num_classes: dict[str, int],
    meta_dims: list[int],
    hierarchy: dict[tuple[str, str], torch.Tensor] | None = None,
    *,
    class_maps: dict[str, ClassMap] | None = None,
    load_pretrained: bool = True,
) -> LinnaeusModel:
    """The model for ``MODEL.TYPE`` with heads for ``task_keys``, started from ``MODEL.PRETRAINED*`` if set.

    ``meta_dims``: the enabled metadata components' DIMs in IDX order ([] = no metadata tokens). ``hierarchy``:
    (parent_key, child_key) → (K_parent, K_child) 0/1 matrix for adjacent configured ranks; required by
    HierarchicalSoftmaxHead / ConditionalClassifier heads. ``class_maps``: this run's classes per task key, used
    to remap a previous Linnaeus model's head rows by taxon id. ``load_pretrained=False``: skip the pretrained
    files (inference rebuilds, whose weights come from a bundle). ``MODEL.FREEZE_BACKBONE`` is applied here.
    ``spec``: the run's ``ModelSpec`` (``resolve_model.model_spec`` in the config package builds it).
    """
    head_specs = resolve_head_specs(spec, task_keys, num_classes)
    if load_pretrained:
        require_pretrained_files(spec)
    backbone = build_backbone(spec, meta_dims)
    head = HierarchicalClassifier(backbone.num_features, list(task_keys), num_classes, head_specs, hierarchy)
    model = LinnaeusModel(backbone, head)
    if spec.view_pooling is not None:  # DATA.OBSERVATIONS: per-view features pooled before the heads
        add_view_pooling(model, spec.view_pooling, spec.view_pooling_temperature)
    if spec.gradient_checkpointing:
        model.set_grad_checkpointing(True)
    if load_pretrained:
        model.pretrained_report = apply_pretrained(model, spec, class_maps)
    if spec.freeze_backbone:
        set_backbone_frozen(model, True)
    return model


def add_view_pooling(model: LinnaeusModel, mode: str, temperature: float = 1.0) -> LinnaeusModel:
    """Make ``model`` multi-view (``DATA.OBSERVATIONS``): per-view features pooled by ``mode`` (MODEL.VIEW_POOLING)
    before the heads. Call it right after building, before weights are loaded or an optimizer is made. With one
    view per observation the pooled feature is the view's own, so the model computes what the image model does."""
    model.pooling = ViewPooling(mode, model.backbone.num_features, temperature)
    return model
