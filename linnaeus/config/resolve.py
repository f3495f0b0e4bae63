"""Read the config once: ``resolve(cfg) -> (RunSpec, problems)``.

Each layer's keys are read in one module (``resolve_data``, ``resolve_model``, ``resolve_engine``). Every rule that
relates keys of different sections, or a key to the launch (``LaunchFacts``), lives here, so
``linnaeus config validate`` lists all of them, one line each, before any file is read, and training refuses the
same config before it builds anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from linnaeus.config.launch_facts import LaunchFacts
from linnaeus.errors import ConfigError

if TYPE_CHECKING:
    from linnaeus.config.defaults import Config, Interval
    from linnaeus.specs import RunSpec

Fail = Callable[[str, str], None]  # (key, message): records one problem
EMA_PHASE = "val_ema"  # the validation phase of the EMA weights (metrics `val_ema/...`)


class Provenance(Protocol):
    """Where each key was set (``linnaeus.config.loader.Provenance`` is one)."""

    def origin(self, key: str) -> str: ...


class _Unknown:
    def origin(self, key: str) -> str:
        return "config"


def resolve(
    cfg: Config, prov: Provenance | None = None, launch: LaunchFacts | None = None
) -> tuple[RunSpec, list[str]]:
    """The run's specs and every cross-key problem (one line each; empty when the config is consistent)."""
    from linnaeus.config.resolve_data import data_spec
    from linnaeus.config.resolve_engine import engine_spec
    from linnaeus.config.resolve_model import aug_spec, loss_spec, model_spec
    from linnaeus.specs import RunSpec

    problems = cross_key_problems(cfg, prov, launch)
    spec = RunSpec(
        data=data_spec(cfg),
        model=model_spec(cfg),
        loss=loss_spec(cfg),
        aug=aug_spec(cfg),
        engine=engine_spec(cfg),
    )
    return spec, problems


def raise_problems(problems: list[str]) -> None:
    """Raise the first problem as a ConfigError that carries all of them (``err.problems``)."""
    if not problems:
        return
    more = f" (+{len(problems) - 1} more; `linnaeus config validate` lists all)" if len(problems) > 1 else ""
    err = ConfigError(problems[0] + more)
    err.problems = list(problems)  # type: ignore[attr-defined]
    raise err


def cross_key_problems(cfg: Config, prov: Provenance | None = None, launch: LaunchFacts | None = None) -> list[str]:
    """Every rule between keys (and, given ``launch``, between keys and the launch), one line each."""
    prov = prov or _Unknown()
    problems: list[str] = []

    def fail(key: str, message: str) -> None:
        problems.append(f"{key} (from {prov.origin(key)}): {message}")

    _shape_rules(cfg, prov, fail)
    _data_rules(cfg, fail)
    _schedule_rules(cfg, fail)
    if launch is not None:
        _launch_rules(cfg, launch, fail)
    return problems


# ------------------------------------------------------------------------------------------------- the rules
def _shape_rules(cfg: Config, prov: Provenance, fail: Fail) -> None:
    """Task keys, heads and class counts agree with each other; image sizes agree."""
    data, model = cfg.DATA, cfg.MODEL
    if data.IMG_SIZE != model.IMG_SIZE:
        key = "DATA.IMG_SIZE" if prov.origin("DATA.IMG_SIZE") != "defaults" else "MODEL.IMG_SIZE"
        fail(key, f"DATA.IMG_SIZE ({data.IMG_SIZE}) must equal MODEL.IMG_SIZE ({model.IMG_SIZE})")
    heads, keys = model.CLASSIFICATION.HEADS, data.TASK_KEYS_H5
    if len(set(keys)) != len(keys):
        fail("DATA.TASK_KEYS_H5", f"expected distinct task keys, got {keys}")
    for key in keys:
        if not key.startswith("taxa_L") or not key[6:].isdigit():
            fail("DATA.TASK_KEYS_H5", f"expected names like 'taxa_L10', got '{key}'")
    if heads:
        for key in keys:
            if key not in heads:
                fail(
                    "DATA.TASK_KEYS_H5",
                    f"'{key}' has no head; add MODEL.CLASSIFICATION.HEADS.{key} (heads defined: {sorted(heads)})",
                )
        for key in heads:
            if key not in keys:
                fail(f"MODEL.CLASSIFICATION.HEADS.{key}", f"head for '{key}' which is not in DATA.TASK_KEYS_H5 {keys}")
    for key, n in (data.NUM_CLASSES_PER_LEVEL or {}).items():
        if key not in keys:
            fail(f"DATA.NUM_CLASSES_PER_LEVEL.{key}", f"'{key}' is not in DATA.TASK_KEYS_H5 {keys}")
        head_n = heads[key].NUM_CLASSES if key in heads else None
        if head_n is not None and head_n != n:
            fail(
                f"MODEL.CLASSIFICATION.HEADS.{key}.NUM_CLASSES",
                f"{head_n} disagrees with DATA.NUM_CLASSES_PER_LEVEL.{key} = {n}",
            )
    if len(cfg.OPTIMIZER.BETAS) != 2:
        fail("OPTIMIZER.BETAS", f"expected two values [beta1, beta2], got {cfg.OPTIMIZER.BETAS}")


def _data_rules(cfg: Config, fail: Fail) -> None:
    """Metadata components, shards, pre-split files and the masking whitelist."""
    data, keys = cfg.DATA, cfg.DATA.TASK_KEYS_H5
    comps = {name: c for name, c in data.META.COMPONENTS.items() if c.ENABLED}
    idxs = [c.IDX for c in comps.values()]
    if data.META.ACTIVE and len(set(idxs)) != len(idxs):
        dup = sorted({i for i in idxs if idxs.count(i) > 1})
        fail("DATA.META.COMPONENTS", f"enabled components must have distinct IDX, IDX {dup} used twice")
    for name, comp in comps.items():
        if comp.COLUMNS and len(comp.COLUMNS) != comp.DIM:
            fail(
                f"DATA.META.COMPONENTS.{name}.DIM",
                f"DIM {comp.DIM} must equal the number of COLUMNS {comp.COLUMNS} ({len(comp.COLUMNS)})",
            )
    if data.SHARDS.ENABLED and not data.SHARDS.DIR:
        fail("DATA.SHARDS.DIR", "DATA.SHARDS.ENABLED is True, so a shard folder is required")
    h5 = data.H5
    if h5.LABELS_PATH is None and not (h5.TRAIN_LABELS_PATH and h5.VAL_LABELS_PATH):
        if h5.TRAIN_LABELS_PATH or h5.VAL_LABELS_PATH:
            fail("DATA.H5.VAL_LABELS_PATH", "pre-split data needs both TRAIN_LABELS_PATH and VAL_LABELS_PATH")
    mix = cfg.SCHEDULE.MIX
    if data.OBSERVATIONS.ENABLED and (mix.MIXUP.ENABLED or mix.CUTMIX.ENABLED):
        fail(
            "SCHEDULE.MIX",
            "Mixup/CutMix mix single images, not observations; turn MIXUP and CUTMIX off with DATA.OBSERVATIONS.ENABLED",
        )
    if mix.GROUP_LEVEL is not None and mix.GROUP_LEVEL not in keys:
        fail("SCHEDULE.MIX.GROUP_LEVEL", f"'{mix.GROUP_LEVEL}' is not in DATA.TASK_KEYS_H5 {keys}")
    for group in cfg.SCHEDULE.META_MASKING.PARTIAL.WHITELIST:
        for name in group:
            if name not in data.META.COMPONENTS:
                fail(
                    "SCHEDULE.META_MASKING.PARTIAL.WHITELIST",
                    f"'{name}' is not a component of DATA.META.COMPONENTS {sorted(data.META.COMPONENTS)}",
                )


def _is_set(interval: Interval) -> bool:
    return any(v is not None for v in (interval.STEPS, interval.EPOCHS, interval.FRACTION))


def _schedule_rules(cfg: Config, fail: Fail) -> None:
    """Settings that only mean something together: the EMA's best checkpoint, unfreezing a frozen backbone."""
    best = cfg.SCHEDULE.CHECKPOINT.BEST_METRIC
    if best.startswith(f"{EMA_PHASE}/") and not cfg.TRAIN.EMA.ENABLED:
        fail("SCHEDULE.CHECKPOINT.BEST_METRIC", f"'{best}' ranks the EMA weights; set TRAIN.EMA.ENABLED: true")
    if _is_set(cfg.MODEL.UNFREEZE_BACKBONE_AFTER) and not cfg.MODEL.FREEZE_BACKBONE:
        fail("MODEL.UNFREEZE_BACKBONE_AFTER", "set only together with MODEL.FREEZE_BACKBONE: true")


def _launch_rules(cfg: Config, launch: LaunchFacts, fail: Fail) -> None:
    """What the launch makes impossible: GradNorm under DeepSpeed, skipping non-finite steps inside DeepSpeed."""
    if cfg.LOSS.GRADNORM.ENABLED and launch.deepspeed:
        # GradNorm takes per-rank gradient norms with torch.autograd.grad; DeepSpeed's engine hooks every gradient
        # and takes that for a backward pass (ZeRO-1/2 reduce and fail; ZeRO-3 partitions the parameters too).
        fail(
            "LOSS.GRADNORM.ENABLED",
            f"GradNorm's per-task gradient norms cannot run under DeepSpeed ({launch.source}), whose engine takes "
            "them for a backward pass; launch with DDP (accelerate_configs/cpu_ddp.yaml, multi_gpu_ddp.yaml) or "
            "disable GradNorm",
        )
    if cfg.TRAIN.NONFINITE == "skip" and launch.deepspeed and _precision(cfg, launch) not in ("fp16", None):
        fail(
            "TRAIN.NONFINITE",
            f"skip is not possible under DeepSpeed ({launch.source}) in bf16/fp32: the engine applies the step "
            "inside backward, before it can be checked; use stop (or fp16, whose loss scaler skips such steps)",
        )


def _precision(cfg: Config, launch: LaunchFacts) -> str | None:
    """The precision the run will use where the config and launch fix it (None: it depends on the GPU)."""
    if launch.precision:
        return launch.precision
    return "no" if cfg.TRAIN.AMP_OPT_LEVEL in (None, "O0") else None


def batch_fill_problem(train_samples: int, batch_size: int, world_size: int) -> str | None:
    """Every process needs at least one full batch of training samples (known once the data is read)."""
    if train_samples >= world_size * batch_size:
        return None
    return (
        f"DATA.BATCH_SIZE: {train_samples} training samples cannot fill one batch of {batch_size} on each of "
        f"{world_size} processes"
    )
