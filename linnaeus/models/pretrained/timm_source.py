"""``timm``: a timm checkpoint for ``MODEL.TYPE: timm`` (the model named by ``MODEL.TIMM.NAME``).

The file's keys are the timm model's. When the model's module has a ``checkpoint_filter_fn`` (timm's converter
from the original repositories' layouts, e.g. DINOv3, EVA, and the position-embedding resizer), it is applied
first, so both timm-hub files and the authors' files load.
"""

from __future__ import annotations

import sys

from torch import nn

from linnaeus.errors import ConfigError
from linnaeus.models.pretrained.files import read_weights
from linnaeus.models.pretrained.report import LoadReport, Transfer


def load_timm(model: nn.Module, path: str) -> LoadReport:
    backbone = model.backbone
    if not hasattr(backbone, "image_prefix"):
        raise ConfigError("MODEL.PRETRAINED_SOURCE: timm needs MODEL.TYPE timm")
    sd = read_weights(path, "MODEL.PRETRAINED")
    timm_model = backbone.model
    convert = getattr(sys.modules[type(timm_model).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        try:
            sd = convert(sd, timm_model)
        except (KeyError, RuntimeError, ValueError, AssertionError) as err:
            raise ConfigError(
                f"MODEL.PRETRAINED: timm could not convert {path} for {type(timm_model).__name__} ({err})"
            ) from None
    transfer = Transfer(model)
    for key, tensor in sd.items():
        transfer.assign(f"backbone.{backbone.image_prefix}{key}", key, tensor)
    return transfer.apply(model, "timm", [path])
