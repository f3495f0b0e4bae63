"""Start a model from pretrained weights (``MODEL.PRETRAINED*``): one module per source, one report format.

``apply_pretrained`` is called by ``build_model``, so every entry point that builds a model for training gets the
weights; inference rebuilds pass ``load_pretrained=False`` (their weights come from the bundle).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from linnaeus.data.taxonomy import ClassMap
from linnaeus.errors import ConfigError
from linnaeus.models.pretrained.files import how_to_get, read_weights
from linnaeus.models.pretrained.report import GROUPS, LoadReport, group_of
from linnaeus.specs.model import ModelSpec

log = logging.getLogger("linnaeus")

SOURCES = ("linnaeus", "timm", "metaformer", "stitched_convnext_ropevit")


def pretrained_source(spec: ModelSpec) -> str | None:
    """The source to load, or None when no pretrained key is set."""
    p = spec.pretrained
    if p.source == "stitched_convnext_ropevit" or (p.source is None and not p.path and (p.convnext or p.ropevit)):
        return "stitched_convnext_ropevit"
    if p.convnext or p.ropevit:
        raise ConfigError(
            "MODEL.PRETRAINED_CONVNEXT / MODEL.PRETRAINED_ROPEVIT: used only with MODEL.PRETRAINED_SOURCE "
            f"stitched_convnext_ropevit, got {p.source}"
        )
    if not p.path:
        if p.source is not None:
            raise ConfigError(f"MODEL.PRETRAINED: required with MODEL.PRETRAINED_SOURCE {p.source}")
        return None
    if p.source is not None:
        return p.source
    return "timm" if spec.type == "timm" else "linnaeus"


def require_pretrained_files(spec: ModelSpec) -> None:
    """Fail before the (possibly large) model is built when a configured weights path does not exist."""
    source = pretrained_source(spec)
    if source is None:
        return
    p = spec.pretrained
    files = (
        (("MODEL.PRETRAINED_CONVNEXT", p.convnext), ("MODEL.PRETRAINED_ROPEVIT", p.ropevit))
        if source == "stitched_convnext_ropevit"
        else (("MODEL.PRETRAINED", p.path),)
    )
    for key, value in files:
        if value and not Path(value).expanduser().exists():
            raise ConfigError(f"{key}: '{value}' is not a local file; {how_to_get(key, value)}")


def apply_pretrained(
    model: nn.Module, spec: ModelSpec, class_maps: dict[str, ClassMap] | None = None
) -> LoadReport | None:
    """Load the configured pretrained weights into ``model`` (a LinnaeusModel) and log the report; None if unset."""
    source = pretrained_source(spec)
    if source is None:
        return None
    if source == "linnaeus":
        from linnaeus.models.pretrained.linnaeus_source import load_linnaeus

        report = load_linnaeus(model, spec.pretrained.path, class_maps)
    elif source == "timm":
        from linnaeus.models.pretrained.timm_source import load_timm

        report = load_timm(model, spec.pretrained.path)
    elif source == "metaformer":
        from linnaeus.models.pretrained.metaformer import load_metaformer

        report = load_metaformer(model, spec)
    else:
        from linnaeus.models.pretrained.stitched import load_stitched

        report = load_stitched(model, spec)
    for line in report.lines():
        log.info("%s", line)
    return report


__all__ = [
    "GROUPS",
    "SOURCES",
    "LoadReport",
    "apply_pretrained",
    "group_of",
    "pretrained_source",
    "read_weights",
    "require_pretrained_files",
]
