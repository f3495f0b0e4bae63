"""The architecture follows the pretrained weights it is built to receive.

A stitched mFormerV1 whose ViT file has LayerScale (``gamma_1``/``gamma_2``) needs LayerScale in its attention stages,
or the pretrained blocks would run without their trained scales (the defect the prior system shipped with). Where the
config leaves ``MODEL.ROPE_STAGES.LAYER_SCALE_INIT_VALUE`` unset, this sets it on the run's config before the config
is resolved and recorded, so the run folder's config.yaml rebuilds the same network. ``linnaeus check`` applies the
same rule, so its pretrained load report is the one training logs.
"""

from __future__ import annotations

from pathlib import Path

from linnaeus.config import Config
from linnaeus.config.resolve_model import model_spec


def follow_pretrained_weights(cfg: Config) -> str | None:
    """Give the attention stages LayerScale when the stitched ViT file has it. Returns the line to log, or None."""
    from linnaeus.models.pretrained import pretrained_source
    from linnaeus.models.pretrained.stitched import LAYER_SCALE_FOR_STITCHED, vit_has_layer_scale

    m = cfg.MODEL
    if pretrained_source(model_spec(cfg)) != "stitched_convnext_ropevit" or not m.PRETRAINED_ROPEVIT:
        return None
    if m.ROPE_STAGES.LAYER_SCALE_INIT_VALUE is not None or not Path(m.PRETRAINED_ROPEVIT).expanduser().is_file():
        return None  # a missing file is reported where the weights are read
    if not vit_has_layer_scale(m.PRETRAINED_ROPEVIT):
        return None
    m.ROPE_STAGES.LAYER_SCALE_INIT_VALUE = LAYER_SCALE_FOR_STITCHED
    return (
        f"MODEL.ROPE_STAGES.LAYER_SCALE_INIT_VALUE set to {LAYER_SCALE_FOR_STITCHED:g}: MODEL.PRETRAINED_ROPEVIT has "
        "LayerScale (gamma_1/gamma_2), so the attention stages get LayerScale and the pretrained blocks keep their "
        "trained scales"
    )
