"""What the model, loss and augmentation layers read (filled by ``linnaeus.config.resolve_model``).

Plain values only: tuples, numbers, strings, frozen dataclasses, and a plain ``dict`` for the open maps a user fills
(``PARAMS``, ``TIMM.KWARGS``, heads by task key). Field names are the config keys in lower case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


# -------------------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class HeadSpec:
    """One head (``MODEL.CLASSIFICATION.HEADS.<task>``, without its ``LOSS``: that is in ``LossSpec``).

    The defaults are ``HeadConfig``'s (a test keeps them equal): the builder uses them for a task with no entry.
    """

    type: str = "LinearHead"
    num_classes: int | None = None
    use_bias: bool = True
    params: Mapping[str, Any] = field(default_factory=dict)
    routing: str = "soft"
    temperature: float = 1.0


@dataclass(frozen=True)
class ConvNeXtStagesSpec:
    """``MODEL.CONVNEXT_STAGES`` (mFormerV1)."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    layer_scale_init_value: float


@dataclass(frozen=True)
class RopeStagesSpec:
    """``MODEL.ROPE_STAGES`` (mFormerV1)."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratio: tuple[float, ...]
    rope_theta: float
    rope_mixed: bool
    layer_scale_init_value: float | None


@dataclass(frozen=True)
class ConvStagesSpec:
    """``MODEL.CONV_STAGES`` (mFormerV0)."""

    stem_dims: tuple[int, ...]
    out_channels: tuple[int, ...]
    depths: tuple[int, ...]
    expand_ratio: float
    se_ratio: float


@dataclass(frozen=True)
class AttentionStagesSpec:
    """``MODEL.ATTENTION_STAGES`` (mFormerV0)."""

    dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratio: tuple[float, ...]


@dataclass(frozen=True)
class TimmSpec:
    """``MODEL.TIMM`` (``MODEL.TYPE: timm``)."""

    name: str | None
    kwargs: Mapping[str, Any]
    global_pool: str | None
    meta_fusion: str


@dataclass(frozen=True)
class PretrainedSpec:
    """``MODEL.PRETRAINED*`` as written; ``linnaeus.models.pretrained.pretrained_source`` decides what they mean."""

    path: str | None
    source: str | None
    convnext: str | None
    ropevit: str | None


@dataclass(frozen=True)
class ModelSpec:
    """Everything ``linnaeus.models`` needs: ``MODEL`` minus the engine's keys (COMPILE, CHANNELS_LAST, UNFREEZE_*).

    ``heads``: ``MODEL.CLASSIFICATION.HEADS`` as configured (empty: a LinearHead per task key). ``params``: the open
    ``MODEL.PARAMS`` map a model registered outside Linnaeus reads in its ``from_spec``.
    """

    type: str
    name: str
    img_size: int
    in_chans: int
    drop_path_rate: float
    drop_rate: float
    attn_drop_rate: float
    only_last_cls: bool
    gradient_checkpointing: bool
    freeze_backbone: bool
    params: Mapping[str, Any]
    pretrained: PretrainedSpec
    timm: TimmSpec
    convnext_stages: ConvNeXtStagesSpec
    rope_stages: RopeStagesSpec
    conv_stages: ConvStagesSpec
    attention_stages: AttentionStagesSpec
    heads: Mapping[str, HeadSpec]
    # MODEL.VIEW_POOLING when DATA.OBSERVATIONS.ENABLED (a multi-view model pools its views before the heads), else
    # None; MODEL.VIEW_POOLING_TEMPERATURE (lse).
    view_pooling: str | None = None
    view_pooling_temperature: float = 1.0


# --------------------------------------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class HeadLossSpec:
    """``MODEL.CLASSIFICATION.HEADS.<task>.LOSS``; the defaults are ``HeadLossConfig``'s (used for a task with no
    head entry; a test keeps them equal)."""

    type: str = "CrossEntropyLoss"
    params: Mapping[str, Any] = field(default_factory=dict)
    weight: float = 1.0


@dataclass(frozen=True)
class ClassWeightingSpec:
    """``LOSS.CLASS_WEIGHTING``."""

    type: str
    cap: float
    smoothing: float


@dataclass(frozen=True)
class GradNormSpec:
    """``LOSS.GRADNORM``."""

    enabled: bool
    alpha: float
    update_interval: int
    warmup_steps: int
    lr: float


@dataclass(frozen=True)
class LossSpec:
    """Everything ``linnaeus.losses`` needs. ``heads``: each configured head's loss, by task key."""

    heads: Mapping[str, HeadLossSpec]
    class_weighting: ClassWeightingSpec
    gradnorm: GradNormSpec

    def head(self, task_key: str) -> HeadLossSpec:
        """The loss of ``task_key``'s head (the default loss when no head is configured for it)."""
        return self.heads.get(task_key, HeadLossSpec())


# ---------------------------------------------------------------------------------------------------------- aug
@dataclass(frozen=True)
class RandomEraseSpec:
    """``AUG.RANDOM_ERASE``; ranges as written (``BatchAugment`` checks them)."""

    prob: float
    area_range: tuple[float, ...]
    aspect_ratio: tuple[float, ...]


@dataclass(frozen=True)
class MixAlgoSpec:
    """``SCHEDULE.MIX.MIXUP`` / ``SCHEDULE.MIX.CUTMIX``."""

    enabled: bool
    alpha: float


@dataclass(frozen=True)
class MixSpec:
    """What mixing does once a batch is mixed (``SCHEDULE.MIX``); how often (``PROB``) is the engine's schedule."""

    group_level: str | None
    mixup: MixAlgoSpec
    cutmix: MixAlgoSpec
    switch_prob: float


@dataclass(frozen=True)
class MetaMaskingSpec:
    """Which components partial metadata masking drops together (``SCHEDULE.META_MASKING.PARTIAL.WHITELIST``);
    the probabilities are the engine's schedule."""

    partial_whitelist: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class AugSpec:
    """Everything ``linnaeus.aug`` needs: ``AUG`` (minus the loader's RRC_*), and mixing / metadata masking."""

    hflip_prob: float
    color_jitter: float
    random_erase: RandomEraseSpec
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mix: MixSpec
    meta_masking: MetaMaskingSpec
