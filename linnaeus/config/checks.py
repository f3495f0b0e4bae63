"""Cross-key rules the schema cannot express per field. Each problem is one line naming the key and its file;
all of them are collected, so `linnaeus config validate` can list every problem at once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from linnaeus.errors import ConfigError

if TYPE_CHECKING:
    from linnaeus.config.defaults import Config


class Provenance(Protocol):
    """Where each key was set (``linnaeus.config.loader.Provenance`` is one)."""

    def origin(self, key: str) -> str: ...


def check_consistency(cfg: Config, prov: Provenance) -> None:
    """Raise a ConfigError for the first cross-key problem (see ``consistency_problems``)."""
    problems = consistency_problems(cfg, prov)
    if problems:
        raise ConfigError(problems[0])


def consistency_problems(cfg: Config, prov: Provenance) -> list[str]:
    problems: list[str] = []

    def _fail(key: str, prov: Provenance, message: str) -> None:
        problems.append(f"{key} (from {prov.origin(key)}): {message}")

    data, model = cfg.DATA, cfg.MODEL
    if data.IMG_SIZE != model.IMG_SIZE:
        key = "DATA.IMG_SIZE" if prov.origin("DATA.IMG_SIZE") != "defaults" else "MODEL.IMG_SIZE"
        _fail(key, prov, f"DATA.IMG_SIZE ({data.IMG_SIZE}) must equal MODEL.IMG_SIZE ({model.IMG_SIZE})")

    heads = model.CLASSIFICATION.HEADS
    keys = data.TASK_KEYS_H5
    if len(set(keys)) != len(keys):
        _fail("DATA.TASK_KEYS_H5", prov, f"expected distinct task keys, got {keys}")
    for key in keys:
        if not key.startswith("taxa_L") or not key[6:].isdigit():
            _fail("DATA.TASK_KEYS_H5", prov, f"expected names like 'taxa_L10', got '{key}'")
    if heads:
        for key in keys:
            if key not in heads:
                _fail(
                    "DATA.TASK_KEYS_H5",
                    prov,
                    f"'{key}' has no head; add MODEL.CLASSIFICATION.HEADS.{key} (heads defined: {sorted(heads)})",
                )
        for key in heads:
            if key not in keys:
                _fail(
                    f"MODEL.CLASSIFICATION.HEADS.{key}",
                    prov,
                    f"head for '{key}' which is not in DATA.TASK_KEYS_H5 {keys}",
                )
    per_level = data.NUM_CLASSES_PER_LEVEL or {}
    for key, n in per_level.items():
        if key not in keys:
            _fail(f"DATA.NUM_CLASSES_PER_LEVEL.{key}", prov, f"'{key}' is not in DATA.TASK_KEYS_H5 {keys}")
        head_n = heads[key].NUM_CLASSES if key in heads else None
        if head_n is not None and head_n != n:
            _fail(
                f"MODEL.CLASSIFICATION.HEADS.{key}.NUM_CLASSES",
                prov,
                f"{head_n} disagrees with DATA.NUM_CLASSES_PER_LEVEL.{key} = {n}",
            )

    comps = {name: c for name, c in data.META.COMPONENTS.items() if c.ENABLED}
    idxs = [c.IDX for c in comps.values()]
    if data.META.ACTIVE and len(set(idxs)) != len(idxs):
        dup = sorted({i for i in idxs if idxs.count(i) > 1})
        _fail("DATA.META.COMPONENTS", prov, f"enabled components must have distinct IDX, IDX {dup} used twice")
    for name, comp in comps.items():
        if comp.COLUMNS and len(comp.COLUMNS) != comp.DIM:
            _fail(
                f"DATA.META.COMPONENTS.{name}.DIM",
                prov,
                f"DIM {comp.DIM} must equal the number of COLUMNS {comp.COLUMNS} ({len(comp.COLUMNS)})",
            )

    if cfg.DATA.SHARDS.ENABLED and not cfg.DATA.SHARDS.DIR:
        _fail("DATA.SHARDS.DIR", prov, "DATA.SHARDS.ENABLED is True, so a shard folder is required")
    if cfg.DATA.H5.LABELS_PATH is None and not (cfg.DATA.H5.TRAIN_LABELS_PATH and cfg.DATA.H5.VAL_LABELS_PATH):
        if cfg.DATA.H5.TRAIN_LABELS_PATH or cfg.DATA.H5.VAL_LABELS_PATH:
            _fail("DATA.H5.VAL_LABELS_PATH", prov, "pre-split data needs both TRAIN_LABELS_PATH and VAL_LABELS_PATH")
    mix = cfg.SCHEDULE.MIX
    if mix.GROUP_LEVEL is not None and mix.GROUP_LEVEL not in keys:
        _fail("SCHEDULE.MIX.GROUP_LEVEL", prov, f"'{mix.GROUP_LEVEL}' is not in DATA.TASK_KEYS_H5 {keys}")
    for group in cfg.SCHEDULE.META_MASKING.PARTIAL.WHITELIST:
        for name in group:
            if name not in data.META.COMPONENTS:
                _fail(
                    "SCHEDULE.META_MASKING.PARTIAL.WHITELIST",
                    prov,
                    f"'{name}' is not a component of DATA.META.COMPONENTS {sorted(data.META.COMPONENTS)}",
                )
    if len(cfg.OPTIMIZER.BETAS) != 2:
        _fail("OPTIMIZER.BETAS", prov, f"expected two values [beta1, beta2], got {cfg.OPTIMIZER.BETAS}")
    return problems
