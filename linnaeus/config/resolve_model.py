"""Config → ``ModelSpec`` / ``LossSpec`` / ``AugSpec``: the one place those layers' keys are read.

Lists become tuples and open maps (``PARAMS``, ``TIMM.KWARGS``) deep copies, so a spec shares nothing mutable with
the config. Checks of a part's own arguments (widths, head counts, ranges) stay with the part that uses them.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from linnaeus.config.defaults import (
    AttentionStages,
    Config,
    ConvNeXtStages,
    ConvStages,
    HeadConfig,
    HeadLossConfig,
    MixAlgo,
    ModelConfig,
    RopeStages,
)
from linnaeus.specs.model import (
    AttentionStagesSpec,
    AugSpec,
    ClassWeightingSpec,
    ConvNeXtStagesSpec,
    ConvStagesSpec,
    GradNormSpec,
    HeadLossSpec,
    HeadSpec,
    LossSpec,
    MetaMaskingSpec,
    MixAlgoSpec,
    MixSpec,
    ModelSpec,
    PretrainedSpec,
    RandomEraseSpec,
    RopeStagesSpec,
    TimmSpec,
)


def _map(values: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(dict(values))


def head_spec(head: HeadConfig) -> HeadSpec:
    return HeadSpec(
        type=head.TYPE,
        num_classes=head.NUM_CLASSES,
        use_bias=head.USE_BIAS,
        params=_map(head.PARAMS),
        routing=head.ROUTING,
        temperature=float(head.TEMPERATURE),
    )


def _convnext(s: ConvNeXtStages) -> ConvNeXtStagesSpec:
    return ConvNeXtStagesSpec(tuple(s.DEPTHS), tuple(s.DIMS), float(s.LAYER_SCALE_INIT_VALUE))


def _rope(s: RopeStages) -> RopeStagesSpec:
    return RopeStagesSpec(
        depths=tuple(s.DEPTHS),
        dims=tuple(s.DIMS),
        num_heads=tuple(s.NUM_HEADS),
        mlp_ratio=tuple(float(r) for r in s.MLP_RATIO),
        rope_theta=float(s.ROPE_THETA),
        rope_mixed=s.ROPE_MIXED,
        layer_scale_init_value=s.LAYER_SCALE_INIT_VALUE,
    )


def _conv(s: ConvStages) -> ConvStagesSpec:
    return ConvStagesSpec(
        tuple(s.STEM_DIMS), tuple(s.OUT_CHANNELS), tuple(s.DEPTHS), float(s.EXPAND_RATIO), float(s.SE_RATIO)
    )


def _attention(s: AttentionStages) -> AttentionStagesSpec:
    return AttentionStagesSpec(tuple(s.DIMS), tuple(s.DEPTHS), tuple(s.NUM_HEADS), tuple(float(r) for r in s.MLP_RATIO))


def model_spec_of(m: ModelConfig) -> ModelSpec:
    """The ``ModelSpec`` of one ``MODEL`` section (what ``model_spec`` reads from a whole config)."""
    t = m.TIMM
    return ModelSpec(
        type=m.TYPE,
        name=m.NAME,
        img_size=m.IMG_SIZE,
        in_chans=m.IN_CHANS,
        drop_path_rate=float(m.DROP_PATH_RATE),
        drop_rate=float(m.DROP_RATE),
        attn_drop_rate=float(m.ATTN_DROP_RATE),
        only_last_cls=m.ONLY_LAST_CLS,
        gradient_checkpointing=m.GRADIENT_CHECKPOINTING,
        freeze_backbone=m.FREEZE_BACKBONE,
        params=_map(m.PARAMS),
        pretrained=PretrainedSpec(m.PRETRAINED, m.PRETRAINED_SOURCE, m.PRETRAINED_CONVNEXT, m.PRETRAINED_ROPEVIT),
        timm=TimmSpec(t.NAME, _map(t.KWARGS), t.GLOBAL_POOL, t.META_FUSION),
        convnext_stages=_convnext(m.CONVNEXT_STAGES),
        rope_stages=_rope(m.ROPE_STAGES),
        conv_stages=_conv(m.CONV_STAGES),
        attention_stages=_attention(m.ATTENTION_STAGES),
        heads={key: head_spec(h) for key, h in m.CLASSIFICATION.HEADS.items()},
    )


def model_spec(cfg: Config) -> ModelSpec:
    """The run's ModelSpec: ``MODEL``, plus view pooling when a sample is an observation (``DATA.OBSERVATIONS``)."""
    spec = model_spec_of(cfg.MODEL)
    if not cfg.DATA.OBSERVATIONS.ENABLED:
        return spec
    return dataclasses.replace(
        spec, view_pooling=cfg.MODEL.VIEW_POOLING, view_pooling_temperature=float(cfg.MODEL.VIEW_POOLING_TEMPERATURE)
    )


def head_loss_spec(loss: HeadLossConfig) -> HeadLossSpec:
    return HeadLossSpec(type=loss.TYPE, params=_map(loss.PARAMS), weight=float(loss.WEIGHT))


def loss_spec(cfg: Config) -> LossSpec:
    cw, gn = cfg.LOSS.CLASS_WEIGHTING, cfg.LOSS.GRADNORM
    return LossSpec(
        heads={key: head_loss_spec(h.LOSS) for key, h in cfg.MODEL.CLASSIFICATION.HEADS.items()},
        class_weighting=ClassWeightingSpec(cw.TYPE, float(cw.CAP), float(cw.SMOOTHING)),
        gradnorm=GradNormSpec(gn.ENABLED, float(gn.ALPHA), gn.UPDATE_INTERVAL, gn.WARMUP_STEPS, float(gn.LR)),
    )


def _mix_algo(a: MixAlgo) -> MixAlgoSpec:
    return MixAlgoSpec(a.ENABLED, float(a.ALPHA))


def aug_spec(cfg: Config) -> AugSpec:
    a, mix = cfg.AUG, cfg.SCHEDULE.MIX
    erase = a.RANDOM_ERASE
    return AugSpec(
        hflip_prob=float(a.HFLIP_PROB),
        color_jitter=float(a.COLOR_JITTER),
        random_erase=RandomEraseSpec(float(erase.PROB), tuple(erase.AREA_RANGE), tuple(erase.ASPECT_RATIO)),
        mean=tuple(float(v) for v in a.MEAN),
        std=tuple(float(v) for v in a.STD),
        mix=MixSpec(mix.GROUP_LEVEL, _mix_algo(mix.MIXUP), _mix_algo(mix.CUTMIX), float(mix.SWITCH_PROB)),
        meta_masking=MetaMaskingSpec(tuple(tuple(g) for g in cfg.SCHEDULE.META_MASKING.PARTIAL.WHITELIST)),
    )
