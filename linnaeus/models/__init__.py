"""Models: mFormerV1 / mFormerV0 / timm backbones, metadata tokens, hierarchical heads, builder, size report."""

from linnaeus.models.builder import LinnaeusModel, add_view_pooling, build_backbone, build_model
from linnaeus.models.heads import (
    ConditionalClassifier,
    HierarchicalClassifier,
    HierarchicalSoftmaxHead,
    LinearHead,
    coarse_to_fine,
    rank_level,
)
from linnaeus.models.mformer_v0 import MFormerV0
from linnaeus.models.mformer_v1 import MFormerV1
from linnaeus.models.param_groups import param_groups, unwrap
from linnaeus.models.registry import list_heads, list_models, register_head, register_model
from linnaeus.models.size import model_size
from linnaeus.models.timm_backbone import TimmBackbone

__all__ = [
    "ConditionalClassifier",
    "HierarchicalClassifier",
    "HierarchicalSoftmaxHead",
    "LinearHead",
    "LinnaeusModel",
    "MFormerV0",
    "MFormerV1",
    "TimmBackbone",
    "add_view_pooling",
    "build_backbone",
    "build_model",
    "coarse_to_fine",
    "list_heads",
    "list_models",
    "model_size",
    "param_groups",
    "rank_level",
    "register_head",
    "register_model",
    "unwrap",
]
