"""Start a model from pretrained weights (``MODEL.PRETRAINED*``): one module per source, one report format.

``apply_pretrained`` is called by ``build_model``, so every entry point that builds a model for training gets the
weights; inference rebuilds pass ``load_pretrained=False`` (their weights come from the bundle).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from linnaeus.config.defaults import ModelConfig
from linnaeus.data.taxonomy import ClassMap
from linnaeus.errors import ConfigError
from linnaeus.models.pretrained.files import how_to_get, read_weights
from linnaeus.models.pretrained.report import GROUPS, LoadReport, group_of

log = logging.getLogger("linnaeus")

SOURCES = ("linnaeus", "timm", "metaformer", "stitched_convnext_ropevit")


def pretrained_source(cfg: ModelConfig) -> str | None:
    """The source to load, or None when no pretrained key is set."""
    if cfg.PRETRAINED_SOURCE == "stitched_convnext_ropevit" or (
        cfg.PRETRAINED_SOURCE is None and not cfg.PRETRAINED and (cfg.PRETRAINED_CONVNEXT or cfg.PRETRAINED_ROPEVIT)
    ):
        return "stitched_convnext_ropevit"
    if cfg.PRETRAINED_CONVNEXT or cfg.PRETRAINED_ROPEVIT:
        raise ConfigError(
            "MODEL.PRETRAINED_CONVNEXT / MODEL.PRETRAINED_ROPEVIT: used only with MODEL.PRETRAINED_SOURCE "
            f"stitched_convnext_ropevit, got {cfg.PRETRAINED_SOURCE}"
        )
    if not cfg.PRETRAINED:
        if cfg.PRETRAINED_SOURCE is not None:
            raise ConfigError(f"MODEL.PRETRAINED: required with MODEL.PRETRAINED_SOURCE {cfg.PRETRAINED_SOURCE}")
        return None
    if cfg.PRETRAINED_SOURCE is not None:
        return cfg.PRETRAINED_SOURCE
    return "timm" if cfg.TYPE == "timm" else "linnaeus"


def require_pretrained_files(cfg: ModelConfig) -> None:
    """Fail before the (possibly large) model is built when a configured weights path does not exist."""
    source = pretrained_source(cfg)
    if source is None:
        return
    keys = (
        ("MODEL.PRETRAINED_CONVNEXT", "MODEL.PRETRAINED_ROPEVIT")
        if source == "stitched_convnext_ropevit"
        else ("MODEL.PRETRAINED",)
    )
    for key in keys:
        value = getattr(cfg, key.split(".")[1])
        if value and not Path(value).expanduser().exists():
            raise ConfigError(f"{key}: '{value}' is not a local file; {how_to_get(key, value)}")


def apply_pretrained(
    model: nn.Module, cfg: ModelConfig, class_maps: dict[str, ClassMap] | None = None
) -> LoadReport | None:
    """Load the configured pretrained weights into ``model`` (a LinnaeusModel) and log the report; None if unset."""
    source = pretrained_source(cfg)
    if source is None:
        return None
    if source == "linnaeus":
        from linnaeus.models.pretrained.linnaeus_source import load_linnaeus

        report = load_linnaeus(model, cfg.PRETRAINED, class_maps)
    elif source == "timm":
        from linnaeus.models.pretrained.timm_source import load_timm

        report = load_timm(model, cfg.PRETRAINED)
    elif source == "metaformer":
        from linnaeus.models.pretrained.metaformer import load_metaformer

        report = load_metaformer(model, cfg)
    else:
        from linnaeus.models.pretrained.stitched import load_stitched

        report = load_stitched(model, cfg)
    for line in report.lines():
        # a skip that changes what loaded pretrained blocks compute must not hide among the INFO lines
        log.log(logging.WARNING if line.startswith("  warning: ") else logging.INFO, "%s", line)
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
