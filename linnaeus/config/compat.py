"""Keys of the prior Polli Linnaeus trainer: the one table that says what each becomes here.

Every key of its default config and shipped configs is either a key of ours (honoured as is), mapped onto ours
(``Map``), or accepted and dropped with one warning line naming what replaces it or why it is not needed
(``Drop``). ``Fixed`` keys describe architecture choices that are fixed here: the prior system's value is
accepted with a warning, any other value is an error (it would silently build a different network).
Per-task lists (``LOSS.TASK_SPECIFIC.TRAIN.FUNCS`` ...) need the final ``DATA.TASK_KEYS_H5``, so they are held
back (``PerTask``) and expanded onto ``MODEL.CLASSIFICATION.HEADS`` after every file and ``--opts`` is merged.

Keys not in this table and not in our schema stay in the tree, so the schema reports them as unknown keys with
the nearest valid key (typos still fail).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from linnaeus.config.dotted import get_dotted, has_dotted, set_dotted

MIGRATE_HINT = "`linnaeus config migrate` rewrites it"


@dataclass(frozen=True)
class Map:
    """Same meaning under our key ``target`` ({0}, {1} = the '*' segments of the pattern)."""

    target: str
    convert: Callable[[Any], Any] | None = None
    note: str = ""


@dataclass(frozen=True)
class Drop:
    """No meaning here; ``reason`` names what replaces it or why it is unnecessary."""

    reason: str


@dataclass(frozen=True)
class Fixed:
    """An architecture choice that is fixed here: ``accepts(value)`` says whether the value is what we build."""

    reason: str
    accepts: Callable[[Any, str | None], bool]  # (value, MODEL.TYPE of the same file or None)


@dataclass(frozen=True)
class PerTask:
    """A list with one entry per ``DATA.TASK_KEYS_H5`` key; expanded after merging (see ``expand_per_task``)."""

    what: str


Rule = Map | Drop | Fixed | PerTask


def _not(value: Any) -> bool:
    return not value


def _first_level(levels: Any) -> Any:
    return levels[0] if isinstance(levels, list) and levels else None


def _standard_strides(seqs: Any, _model_type: str | None = None) -> bool:
    """Prior STRIDE_SEQS that equal what we build: each stage's first block strides 2 (conv stage 2: 1), rest 1."""
    if not isinstance(seqs, list) or len(seqs) != 2 or not all(isinstance(s, list) and s for s in seqs):
        return False
    return all(all(v == 1 for v in s[1:]) for s in seqs)


def _in(*allowed: Any) -> Callable[[Any, str | None], bool]:
    return lambda v, _t: v in allowed


def _per_type(v1: str, v0: str) -> Callable[[Any, str | None], bool]:
    """What each model type builds; a file that does not name its type may describe either."""
    built = {"mFormerV1": v1, "mFormerV0": v0}

    def accepts(value: Any, model_type: str | None) -> bool:
        return value == built[model_type] if model_type in built else value in (v1, v0)

    return accepts


def _any(_: Any, _t: str | None = None) -> bool:
    return True


_OUTPUTS = "the run folder is EXPERIMENT.OUTPUT_DIR/PROJECT/GROUP/NAME"
_DEBUG = "debug output here is chosen with EXPERIMENT.LOG_LEVEL"
_PIPELINE = "the input pipeline here is torch DataLoader workers (DATA.NUM_WORKERS)"
_ENV = "environment setup is not part of the config here; paths are plain paths"

# Patterns: dotted keys; '*' matches one segment, a trailing '**' any subtree below the prefix.
TABLE: dict[str, Rule] = {
    # ----------------------------------------------------------------------------- inheritance / top level
    "BASE": Drop("an empty prior-system BASE entry; inheritance here is BASE: [files]"),
    "LOADING_FROM_CHECKPOINT": Drop("internal flag; resuming is TRAIN.AUTO_RESUME / TRAIN.RESUME_FROM"),
    "*.FROM": Drop("section inheritance (FROM) was never processed by Polli Linnaeus; use BASE"),
    # ------------------------------------------------------------------------------------------ EXPERIMENT
    "EXPERIMENT.CODE_VERSION": Drop("the run records its own code version in the run folder"),
    "EXPERIMENT.LOG_LEVEL_MAIN": Map("EXPERIMENT.LOG_LEVEL"),
    "EXPERIMENT.LOG_LEVEL_H5DATA": Drop("one log level here: EXPERIMENT.LOG_LEVEL"),
    "EXPERIMENT.LOG_LEVEL_VALIDATION": Drop("one log level here: EXPERIMENT.LOG_LEVEL"),
    "EXPERIMENT.WANDB.RESUME": Drop("resumed runs always reattach to their saved W&B run id"),
    "EXPERIMENT.WANDB.KEY": Drop("W&B reads its key from the environment (WANDB_API_KEY / wandb login)"),
    # ------------------------------------------------------------------------------------------------- ENV
    "ENV.OUTPUT.BASE_DIR": Map("EXPERIMENT.OUTPUT_DIR"),
    "ENV.**": Drop(_ENV),
    "MISC.OUTPUT": Drop(_OUTPUTS),
    "MISC.SAVE_FREQ": Drop("checkpoint cadence is SCHEDULE.CHECKPOINT.INTERVAL"),
    "MISC.PRINT_FREQ": Drop("train metrics cadence is SCHEDULE.METRICS.LOG_INTERVAL_STEPS"),
    "MISC.PIPELINE_METRICS_FREQ": Drop("train metrics cadence is SCHEDULE.METRICS.LOG_INTERVAL_STEPS"),
    "DEBUG.**": Drop(_DEBUG),
    "DISTRIBUTED.**": Drop("processes, backend and DDP options come from the accelerate config (accelerate_configs/)"),
    "CHECKPOINT.**": Drop("deprecated there too; SCHEDULE.CHECKPOINT (INTERVAL, KEEP_LAST_N, KEEP_BEST_N) replaces it"),
    "METRICS.**": Drop("metrics here are fixed: per-rank top-1/top-5, chain accuracy, null/non-null splits"),
    "VAL.**": Drop("validation here: SCHEDULE.VALIDATION (INTERVAL, MASK_META_INTERVAL); DATA.VAL_CROP_PCT"),
    # ------------------------------------------------------------------------------------------------ DATA
    "DATA.DATASET_NAME": Map("DATA.DATASET.NAME"),
    "DATA.USE_VECTORIZED_PROCESSOR": Drop("labels are always read vectorised here"),
    "DATA.SAMPLER.**": Drop("batches are shuffled uniformly; Mixup/CutMix pairs are chosen within the batch"),
    "DATA.SIMULATE_HPC": Drop("no simulated I/O delay here; measure the real pipeline with `linnaeus bench`"),
    "DATA.IO_DELAY": Drop("no simulated I/O delay here; measure the real pipeline with `linnaeus bench`"),
    "DATA.AUTOBATCH.**": Drop("no autobatch; `linnaeus check` prints model size, pick DATA.BATCH_SIZE"),
    "DATA.PARTIAL.LEVELS": Map("DATA.REQUIRE_ALL_RANKS", _not, "PARTIAL.LEVELS False = drop rows with a null rank"),
    "DATA.OUT_OF_REGION.INCLUDE": Map("DATA.IN_REGION_ONLY", _not),
    "DATA.UPWARD_MAJOR_CHECK": Drop("labels are checked against the taxonomy on every run"),
    "DATA.DATASET_META.**": Drop("labels.h5 metadata is recorded in the run's labels_provenance.json"),
    "DATA.H5.IMAGES_PATH": Drop("images are read from DATA.HYBRID.IMAGES_DIR or WebDataset shards"),
    "DATA.H5.TRAIN_IMAGES_PATH": Drop("images are read from DATA.HYBRID.IMAGES_DIR or WebDataset shards"),
    "DATA.H5.VAL_IMAGES_PATH": Drop("images are read from DATA.HYBRID.IMAGES_DIR or WebDataset shards"),
    "DATA.HYBRID.SHARDING.**": Drop("image folders are read as given; packed data is DATA.SHARDS"),
    "DATA.HYBRID.LUT_CACHE.**": Drop("image folders are read as given; packed data is DATA.SHARDS"),
    "DATA.HYBRID.VERIFY_IMAGES.CHUNK_SIZE": Drop("images are checked by a thread pool of NUM_WORKERS"),
    "DATA.HYBRID.VERIFY_IMAGES.LOG_MISSING": Drop("problems always go to the JSON report and the log"),
    "DATA.PREFETCH.**": Drop(_PIPELINE),
    # ------------------------------------------------------------------------------------------------- AUG
    "AUG.PIPELINE_DEVICE": Drop("augmentation runs in the DataLoader workers, Mixup/CutMix on the batch"),
    "AUG.SINGLE_AUG_DEVICE": Drop("augmentation runs in the DataLoader workers, Mixup/CutMix on the batch"),
    "AUG.USE_OPENCV": Drop("images are decoded with PIL"),
    "AUG.AUTOAUG.POLICY": Drop("fixed recipe here: random-resized crop, flip, colour jitter (AUG.*), random erase"),
    "AUG.AUTOAUG.COLOR_JITTER": Map("AUG.COLOR_JITTER"),
    "AUG.RANDOM_ERASE.MODE": Drop("erased areas are filled with per-pixel noise (the prior 'pixel' mode)"),
    "AUG.RANDOM_ERASE.COUNT": Drop("one erased area per image"),
    "AUG.RANDOM_ERASE.MAX_COUNT": Drop("one erased area per image"),
    "AUG.GPU_COMPILE.**": Drop("augmentation is not compiled; MODEL.COMPILE compiles the model"),
    "AUG.SELECTIVE_MIXING.**": Drop("Mixup/CutMix is a plain tensor op on the batch"),
    # ----------------------------------------------------------------------------------------------- MODEL
    "MODEL.NUM_CLASSES": Drop("class counts come from labels.h5 (check them with HEADS.<task>.NUM_CLASSES)"),
    "MODEL.LABEL_SMOOTHING": Drop("label smoothing is set per head: HEADS.<task>.LOSS.PARAMS.label_smoothing"),
    "MODEL.EXTRA_TOKEN_NUM": Drop("derived: 1 + number of enabled DATA.META.COMPONENTS"),
    "MODEL.META_DIMS": Drop("derived from DATA.META.COMPONENTS"),
    "MODEL.USE_FLASH_ATTN": Drop("PyTorch SDPA picks the fastest attention kernel itself"),
    "MODEL.FIND_UNUSED_PARAMETERS": Drop("set by the trainer when a step leaves parameters unused"),
    "MODEL.FEATURE_RESOLVER.**": Drop("never wired into mFormerV0/V1 in Polli Linnaeus either"),
    "MODEL.ATTENTION_MECHANISM.**": Drop("never wired into mFormerV0/V1 in Polli Linnaeus either"),
    "MODEL.OTHER_COMPONENTS.**": Drop("never wired into mFormerV0/V1 in Polli Linnaeus either"),
    "MODEL.AGGREGATION.TYPE": Fixed("the two CLS tokens are always mixed by a Conv1d", _in("Conv1d", "default")),
    "MODEL.AGGREGATION.PARAMETERS.**": Fixed("sized from the last stage's width", _any),
    "MODEL.NORMALIZATION.CONV_NORM_LAYER": Fixed(
        "V1 uses channels-first LayerNorm, V0 BatchNorm2d", _per_type("LayerNormChannelsFirst", "BatchNorm2d")
    ),
    "MODEL.NORMALIZATION.ATTENTION_NORM_LAYER": Fixed("attention blocks use LayerNorm", _in("LayerNorm")),
    "MODEL.NORMALIZATION.ACTIVATION_LAYER": Fixed(
        "GELU in blocks, ReLU in V0's stem, Swish in MBConv", _in("GELU", "ReLU")
    ),
    "MODEL.CONV_STAGES.STEM_OUT": Drop("ignored by Polli Linnaeus too; the stem width is CONV_STAGES.STEM_DIMS"),
    "MODEL.CONV_STAGES.EMBED_DIMS": Map(
        "MODEL.CONV_STAGES.STEM_DIMS",
        lambda dims: [3 * int(dims[0]) // 4, int(dims[0])] if isinstance(dims, list) and dims else dims,
        "the stem is 3/4·E0 -> E0 with E0 = EMBED_DIMS[0]; EMBED_DIMS[1] was unused",
    ),
    "MODEL.CONV_STAGES.STRIDE_SEQS": Fixed("stage 1 strides 2 in its first block, all else 1", _standard_strides),
    "MODEL.ATTENTION_STAGES.EMBED_DIMS": Map("MODEL.ATTENTION_STAGES.DIMS"),
    "MODEL.ATTENTION_STAGES.ATTENTION_TYPE": Fixed(
        "mFormerV0 attention is relative-position attention",
        lambda v, _t: isinstance(v, list) and all(t == "RelativeAttention" for t in v),
    ),
    "MODEL.ATTENTION_STAGES.STRIDE_SEQS": Fixed("each stage strides 2 in its first block", _standard_strides),
    "MODEL.CLASSIFICATION.HEADS.*.ROUTING_STRATEGY": Map("MODEL.CLASSIFICATION.HEADS.{0}.ROUTING"),
    # ------------------------------------------------------------------------------------------------ LOSS
    "LOSS.TASK_SPECIFIC.TRAIN.FUNCS": PerTask("loss"),
    "LOSS.TASK_SPECIFIC.VAL.FUNCS": Drop("validation reports the training criterion; accuracy does not depend on it"),
    "LOSS.TAXONOMY_SMOOTHING.ENABLED": PerTask("taxonomy smoothing"),
    "LOSS.TAXONOMY_SMOOTHING.ALPHA": PerTask("smoothing alpha"),
    "LOSS.TAXONOMY_SMOOTHING.BETA": PerTask("smoothing beta"),
    "LOSS.TAXONOMY_SMOOTHING.UNIFORM_ROOTS": Drop("roots at the coarsest rank are smoothed uniformly, always"),
    "LOSS.TAXONOMY_SMOOTHING.FALLBACK_TO_UNIFORM": Drop("every rank has a hierarchy here (given or inferred)"),
    "LOSS.TAXONOMY_SMOOTHING.PARTIAL_SUBTREE_WEIGHTING": Drop("disconnected subtrees get uniform smoothing"),
    "LOSS.GRAD_WEIGHTING.TASK.TYPE": Map("LOSS.GRADNORM.ENABLED", lambda t: t == "gradnorm"),
    "LOSS.GRAD_WEIGHTING.TASK.GRADNORM_ENABLED": Map("LOSS.GRADNORM.ENABLED"),
    "LOSS.GRAD_WEIGHTING.TASK.ALPHA": Map("LOSS.GRADNORM.ALPHA"),
    "LOSS.GRAD_WEIGHTING.TASK.UPDATE_INTERVAL": Map("LOSS.GRADNORM.UPDATE_INTERVAL"),
    "LOSS.GRAD_WEIGHTING.TASK.GRADNORM_WARMUP_STEPS": Map("LOSS.GRADNORM.WARMUP_STEPS"),
    "LOSS.GRAD_WEIGHTING.TASK.INIT_WEIGHTS": PerTask("static weight"),
    "LOSS.GRAD_WEIGHTING.TASK.INIT_STRATEGY": Drop("initial weights are HEADS.<task>.LOSS.WEIGHT (default 1)"),
    "LOSS.GRAD_WEIGHTING.TASK.EXCLUDE_CONFIG.**": Drop("GradNorm here measures the last shared backbone layer"),
    "LOSS.GRAD_WEIGHTING.TASK.EXCLUDE_PATTERNS": Drop("GradNorm here measures the last shared backbone layer"),
    "LOSS.GRAD_WEIGHTING.TASK.ZERO_AUX_INFO": Drop("GradNorm here needs no re-forward pass"),
    "LOSS.GRAD_WEIGHTING.TASK.GRADNORM_ACCUM_STEPS": Drop("GradNorm here needs no re-forward pass"),
    "LOSS.GRAD_WEIGHTING.TASK.USE_LINEAR_HEADS_FOR_GRADNORM_REFORWARD": Drop("GradNorm here needs no re-forward"),
    "LOSS.GRAD_WEIGHTING.CLASS.TRAIN": Drop("class weighting (LOSS.CLASS_WEIGHTING) applies to training only"),
    "LOSS.GRAD_WEIGHTING.CLASS.VAL": Drop("class weighting (LOSS.CLASS_WEIGHTING) applies to training only"),
    "LOSS.GRAD_WEIGHTING.CLASS.METHOD": PerTask("class weighting method"),
    "LOSS.GRAD_WEIGHTING.CLASS.CAP": PerTask("class weighting cap"),
    "LOSS.GRAD_WEIGHTING.SUBSET.**": Drop("unimplemented in Polli Linnaeus"),
    "LOSS.GRAD_WEIGHTING.TAXALIGN.**": Drop("deprecated in Polli Linnaeus"),
    # ----------------------------------------------------------------------------------------------- TRAIN
    "TRAIN.START_EPOCH": Drop("resumed runs continue from their checkpoint's step"),
    "TRAIN.ALLOW_WANDB_VAL_CHANGE": Drop("resumed runs reattach to their W&B run as is"),
    "TRAIN.GRADIENT_CHECKPOINTING.ENABLED_NORMAL_STEPS": Map("MODEL.GRADIENT_CHECKPOINTING"),
    "TRAIN.GRADIENT_CHECKPOINTING.ENABLED_GRADNORM_STEPS": Drop("GradNorm here needs no re-forward pass"),
    "TRAIN.PHASE1_MASK_NULL_LOSS": Drop("null labels never add loss unless SCHEDULE.NULL_MASKING.ENABLED"),
    "TRAIN.PRESERVE_CHECKPOINT_SCHEDULE": Drop("had no effect in Polli Linnaeus"),
    "TRAIN.EARLY_STOP.MAX_STEPS": Map("TRAIN.MAX_STEPS"),
    "TRAIN.EARLY_STOP.**": Drop("no early stopping; keep the best checkpoints with SCHEDULE.CHECKPOINT.KEEP_BEST_N"),
    # ------------------------------------------------------------------------------------ OPTIMIZER / LR
    # A third beta was AdEMAMix's; AdamW takes two.
    "OPTIMIZER.BETAS": Map("OPTIMIZER.BETAS", lambda b: list(b)[:2] if isinstance(b, list | tuple) else b),
    "OPTIMIZER.MOMENTUM": Drop("the optimizer is AdamW (OPTIMIZER.BETAS)"),
    "OPTIMIZER.ALPHA": Drop("AdEMAMix is not offered; the optimizer is AdamW"),
    "OPTIMIZER.T_ALPHA_BETA3": Drop("AdEMAMix is not offered; the optimizer is AdamW"),
    "OPTIMIZER.MUON.**": Drop("Muon is not offered; the optimizer is AdamW"),
    "OPTIMIZER.PARAMETER_GROUPS.**": Drop(
        "parameter groups are fixed: no weight decay on norms/biases/tokens, heads at OPTIMIZER.HEAD_LR_MULTIPLIER"
    ),
    "LR_SCHEDULER.PARAMETER_GROUPS.**": Drop("one schedule for all groups (heads scale by HEAD_LR_MULTIPLIER)"),
    "LR_SCHEDULER.REFERENCE_LR": Drop("was only logged; scaling is BASE_LR x batch / REFERENCE_BS (SCALE_WITH_BATCH)"),
    "LR_SCHEDULER.TOTAL_STEPS": Drop("computed from TRAIN.EPOCHS / TRAIN.MAX_STEPS"),
    "LR_SCHEDULER.DECAY_STEPS": Drop("the 'step' schedule is not offered (NAME: cosine, wsd or constant)"),
    "LR_SCHEDULER.DECAY_FRACTION": Drop("the 'step' schedule is not offered (NAME: cosine, wsd or constant)"),
    "LR_SCHEDULER.DECAY_RATE": Drop("the 'step' schedule is not offered (NAME: cosine, wsd or constant)"),
    "LR_SCHEDULER.STABLE_DURATION_FRACTION": Map("LR_SCHEDULER.STABLE_FRACTION"),
    "LR_SCHEDULER.DECAY_DURATION_FRACTION": Drop("wsd decays over all post-warmup steps after STABLE_FRACTION"),
    # -------------------------------------------------------------------------------------------- SCHEDULE
    "SCHEDULE.META_MASKING.PARTIAL.START_STEPS": Drop("partial masking runs for the whole run here"),
    "SCHEDULE.META_MASKING.PARTIAL.START_FRACTION": Drop("partial masking runs for the whole run here"),
    "SCHEDULE.META_MASKING.PARTIAL.END_STEPS": Drop("partial masking runs for the whole run here"),
    "SCHEDULE.META_MASKING.PARTIAL.END_FRACTION": Drop("partial masking runs for the whole run here"),
    "SCHEDULE.META_MASKING.PARTIAL.END_PROB": Map("SCHEDULE.META_MASKING.PARTIAL.PROB", note="a constant PROB here"),
    "SCHEDULE.META_MASKING.PARTIAL.START_PROB": Drop("partial masking has one constant PROB (END_PROB is used)"),
    "SCHEDULE.META_MASKING.PARTIAL.PROB_END_STEPS": Drop("partial masking has one constant PROB"),
    "SCHEDULE.META_MASKING.PARTIAL.PROB_END_FRACTION": Drop("partial masking has one constant PROB"),
    "SCHEDULE.META_MASKING.PARTIAL.WEIGHTS": Drop("whitelisted subsets are drawn uniformly"),
    "SCHEDULE.MIX.GROUP_LEVELS": Map("SCHEDULE.MIX.GROUP_LEVEL", _first_level, "only the first level was used"),
    "SCHEDULE.MIX.LEVEL_SWITCH_EPOCHS": Drop("group-level switching was disabled in Polli Linnaeus"),
    "SCHEDULE.MIX.LEVEL_SWITCH_STEPS": Drop("group-level switching was disabled in Polli Linnaeus"),
    "SCHEDULE.MIX.USE_GPU": Drop("mixing runs where the batch is"),
    "SCHEDULE.MIX.MIN_GROUP_SIZE": Drop("samples without a same-group partner are left unmixed"),
    "SCHEDULE.MIX.EXCLUDE_NULL_SAMPLES": Drop("samples null at GROUP_LEVEL have no group and are left unmixed"),
    "SCHEDULE.MIX.NULL_TASK_KEYS": Drop("samples null at GROUP_LEVEL have no group and are left unmixed"),
    "SCHEDULE.MIX.CHUNK_BOUNDS": Drop("metadata is mixed with the image"),
    "SCHEDULE.MIX.CUTMIX.MINMAX": Drop("CutMix boxes follow timm's Beta(ALPHA) area rule"),
    "SCHEDULE.METRICS.WANDB_INTERVAL": Map("SCHEDULE.METRICS.LOG_INTERVAL_STEPS"),
    "SCHEDULE.METRICS.CONSOLE_INTERVAL": Drop("console and W&B share SCHEDULE.METRICS.LOG_INTERVAL_STEPS"),
    "SCHEDULE.METRICS.LR_INTERVAL": Drop("the LR is logged with every train metrics line"),
    "SCHEDULE.METRICS.PIPELINE_INTERVAL": Drop("throughput is logged with every train metrics line"),
    "SCHEDULE.METRICS.*_FRACTION": Drop("train metrics cadence is SCHEDULE.METRICS.LOG_INTERVAL_STEPS"),
    "SCHEDULE.VALIDATION.INTERVAL_EPOCHS": Map("SCHEDULE.VALIDATION.INTERVAL.EPOCHS"),
    "SCHEDULE.VALIDATION.INTERVAL_STEPS": Map("SCHEDULE.VALIDATION.INTERVAL.STEPS"),
    "SCHEDULE.VALIDATION.INTERVAL_FRACTION": Map("SCHEDULE.VALIDATION.INTERVAL.FRACTION"),
    "SCHEDULE.VALIDATION.MASK_META_INTERVAL_EPOCHS": Map("SCHEDULE.VALIDATION.MASK_META_INTERVAL.EPOCHS"),
    "SCHEDULE.VALIDATION.MASK_META_INTERVAL_STEPS": Map("SCHEDULE.VALIDATION.MASK_META_INTERVAL.STEPS"),
    "SCHEDULE.VALIDATION.MASK_META_INTERVAL_FRACTION": Map("SCHEDULE.VALIDATION.MASK_META_INTERVAL.FRACTION"),
    "SCHEDULE.VALIDATION.PARTIAL_MASK_META.**": Drop("validation runs with and without metadata (MASK_META_INTERVAL)"),
    "SCHEDULE.VALIDATION.FINAL_EPOCH.**": Drop("validation runs with and without metadata (MASK_META_INTERVAL)"),
    "SCHEDULE.CHECKPOINT.INTERVAL_EPOCHS": Map("SCHEDULE.CHECKPOINT.INTERVAL.EPOCHS"),
    "SCHEDULE.CHECKPOINT.INTERVAL_STEPS": Map("SCHEDULE.CHECKPOINT.INTERVAL.STEPS"),
    "SCHEDULE.CHECKPOINT.INTERVAL_FRACTION": Map("SCHEDULE.CHECKPOINT.INTERVAL.FRACTION"),
    "SCHEDULE.CHECKPOINT.KEEP_TOP_N": Map("SCHEDULE.CHECKPOINT.KEEP_BEST_N"),
}

# Keys whose 0 meant "unset" in Polli Linnaeus when a sibling alternative is set (key -> its alternatives).
ZERO_MEANS_UNSET: dict[str, tuple[str, ...]] = {
    "END_STEPS": ("END_FRACTION",),
    "WARMUP_STEPS": ("WARMUP_EPOCHS", "WARMUP_FRACTION"),
    "INTERVAL_STEPS": ("INTERVAL_EPOCHS", "INTERVAL_FRACTION"),
    "MASK_META_INTERVAL_STEPS": ("MASK_META_INTERVAL_EPOCHS", "MASK_META_INTERVAL_FRACTION"),
    "INTERVAL_FRACTION": ("INTERVAL_EPOCHS", "INTERVAL_STEPS"),
    "MASK_META_INTERVAL_FRACTION": ("MASK_META_INTERVAL_EPOCHS", "MASK_META_INTERVAL_STEPS"),
    "KEEP_LAST_N": (),  # 0 kept every checkpoint there; here the default (keep the last 2) applies
}


def _compile(pattern: str) -> re.Pattern[str]:
    parts = pattern.split(".")
    out = []
    for p in parts:
        if p == "**":
            out.append(r"(?:\..+)?")
            continue
        piece = re.escape(p).replace(r"\*", "([^.]+)")
        out.append(("\\." if out else "") + piece)
    return re.compile("".join(out) + "$")


_COMPILED = [(pattern, _compile(pattern), rule) for pattern, rule in TABLE.items()]


def lookup(dotted: str) -> tuple[Rule, tuple[str, ...]] | None:
    """The rule for a prior key and the values of its '*' segments; exact patterns win over wildcard ones."""
    best = None
    for pattern, rx, rule in _COMPILED:
        m = rx.match(dotted)
        if m:
            score = (pattern.count("*") == 0, len(pattern))
            if best is None or score > best[0]:
                best = (score, rule, tuple(g for g in m.groups() if g is not None))
    return None if best is None else (best[1], best[2])


def is_prior_key(dotted: str) -> bool:
    return lookup(dotted) is not None


@dataclass
class Finding:
    """One compat translation: which key, where it came from, what happened (one warning line)."""

    key: str
    origin: str
    message: str
    target: str | None = None

    def line(self) -> str:
        return f"{self.key} (from {self.origin}): {self.message}"


LIST_HINT = "`linnaeus config validate --cfg FILE --verbose` lists them"


def summary_line(findings: list[Finding]) -> str | None:
    """One line for all of a config's compat findings (None when there are none): how many prior-system keys were
    read under our names and how many were ignored, and the two commands that migrate or list them."""
    if not findings:
        return None
    ignored = sum(f.message.startswith(("ignored", "accepted, not needed")) or "dropped" in f.message for f in findings)
    read = len(findings) - ignored
    noun = "key" if len(findings) == 1 else "keys"
    return (
        f"{len(findings)} prior-system {noun}: {read} read under new names, {ignored} ignored; "
        f"`linnaeus config migrate FILE` rewrites them; {LIST_HINT}"
    )


@dataclass
class Held:
    """A per-task list held back until DATA.TASK_KEYS_H5 is final."""

    key: str
    value: Any
    origin: str
    what: str


@dataclass
class Translation:
    tree: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)
    held: list[Held] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- translation
def _leaves(value: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        out = []
        for k, v in value.items():
            out += _leaves(v, f"{prefix}.{k}")
        return out
    return [(prefix, value)]


def translate(raw: dict[str, Any], origin: str, known: Callable[[str], str | None]) -> Translation:
    """Rewrite one file's (or --opts') tree into our keys. ``known(dotted)`` -> 'node' | 'leaf' | None."""
    out: dict[str, Any] = {}
    result = Translation(out)
    renamed: list[tuple[str, str, Any, Map]] = []
    model = raw.get("MODEL")
    model_type = model.get("TYPE") if isinstance(model, dict) and isinstance(model.get("TYPE"), str) else None
    _walk(raw, "", out, result, known, origin, renamed, model_type)
    mapped: dict[str, str] = {}
    for src, target, value, rule in renamed:
        if target in mapped and isinstance(value, bool):
            # Two prior switches for one feature (GRAD_WEIGHTING.TASK.TYPE and GRADNORM_ENABLED): both must be on.
            set_dotted(out, target, bool(get_dotted(out, target)) and value)
            result.findings.append(Finding(src, origin, f"read as {target} together with {mapped[target]}", target))
            continue
        if has_dotted(out, target):
            result.findings.append(Finding(src, origin, f"ignored: {target} is also set in this file and wins"))
            continue
        mapped[target] = src
        set_dotted(out, target, value)
        note = f" ({rule.note})" if rule.note else ""
        result.findings.append(Finding(src, origin, f"read as {target}{note}; {MIGRATE_HINT}", target))
    return result


def _walk(
    node: dict[str, Any],
    prefix: str,
    out: dict[str, Any],
    result: Translation,
    known: Callable[[str], str | None],
    origin: str,
    renamed: list,
    model_type: str | None,
) -> None:
    for key, value in node.items():
        key = str(key)
        dotted = f"{prefix}.{key}" if prefix else key
        if value == "None":  # yacs read the string None as None (its values go through literal_eval)
            value = None
        kind = known(dotted)
        if kind == "node" and isinstance(value, dict):
            sub: dict[str, Any] = {}
            _walk(value, dotted, sub, result, known, origin, renamed, model_type)
            if sub or not value:
                out[key] = sub
            continue
        if kind is not None:
            if _zero_is_unset(key, value, node):
                siblings = [s for s in ZERO_MEANS_UNSET[key] if node.get(s) not in (None, "None", 0)]
                why = f"{' / '.join(siblings)} is used" if siblings else "the default applies"
                result.findings.append(Finding(dotted, origin, f"0 means unset in Polli Linnaeus configs; {why}"))
                continue
            reshaped = lookup(dotted)
            if reshaped and isinstance(reshaped[0], Map) and reshaped[0].target == dotted and reshaped[0].convert:
                converted = reshaped[0].convert(value)
                if converted != value:
                    result.findings.append(Finding(dotted, origin, f"{value!r} read as {converted!r}"))
                    value = converted
            out[key] = value
            continue
        if isinstance(value, dict) and value:
            # Look the leaves up one by one, so an exact rule below a subtree rule wins (ENV.OUTPUT.BASE_DIR).
            sub = {}
            _walk(value, dotted, sub, result, known, origin, renamed, model_type)
            if sub:
                out[key] = sub
            continue
        found = lookup(dotted)
        if found is None:
            out[key] = value  # unknown: the schema reports it (with the nearest valid key)
            continue
        rule, groups = found
        if isinstance(rule, Map):
            if _zero_is_unset(key, value, node):
                result.findings.append(Finding(dotted, origin, "0 means unset in Polli Linnaeus configs; dropped"))
                continue
            converted = rule.convert(value) if rule.convert else value
            renamed.append((dotted, rule.target.format(*groups), converted, rule))
        elif isinstance(rule, PerTask):
            result.held.append(Held(dotted, value, origin, rule.what))
        elif isinstance(rule, Fixed):
            for leaf, v in _leaves(value, dotted):
                if rule.accepts(v, model_type):
                    result.findings.append(Finding(leaf, origin, f"accepted, not needed: {rule.reason}"))
                else:
                    result.errors.append(
                        f"{leaf} (from {origin}): {v!r} is not built here ({rule.reason}); remove the key"
                    )
        else:
            for leaf, _ in _leaves(value, dotted):
                result.findings.append(Finding(leaf, origin, f"ignored: {rule.reason}"))


def _zero_is_unset(key: str, value: Any, siblings: dict[str, Any]) -> bool:
    if key not in ZERO_MEANS_UNSET or isinstance(value, bool) or value != 0:
        return False
    alternatives = ZERO_MEANS_UNSET[key]
    return not alternatives or any(siblings.get(s) not in (None, "None", 0) for s in alternatives)


# ---------------------------------------------------------------------------------------------- per task
def _per_task_list(h: Held, keys: list[str], errors: list[str]) -> list[Any] | None:
    value = h.value
    if not isinstance(value, list):
        return [value] * len(keys)
    if len(value) != len(keys):
        errors.append(
            f"{h.key} (from {h.origin}): {len(value)} entries for {len(keys)} task keys {keys}; one per"
            " DATA.TASK_KEYS_H5 key"
        )
        return None
    return value


def expand_per_task(
    tree: dict[str, Any], held: list[Held], explicit: Callable[[str], bool]
) -> tuple[list[Finding], list[str], dict[str, str]]:
    """Write held per-task lists onto HEADS / LOSS keys; keys set explicitly (``explicit(dotted)``) win.

    Returns (warning findings, error lines, {our dotted key: origin}) for provenance.
    """
    findings: list[Finding] = []
    errors: list[str] = []
    origins: dict[str, str] = {}
    keys = tree.get("DATA", {}).get("TASK_KEYS_H5") or ["taxa_L10", "taxa_L20"]
    by_key = {h.key: h for h in held}  # a later file's list replaces an earlier one
    heads_prefix = "MODEL.CLASSIFICATION.HEADS"

    def put(dotted: str, value: Any, h: Held) -> None:
        if explicit(dotted):
            return
        set_dotted(tree, dotted, value)
        origins[dotted] = h.origin

    funcs = by_key.get("LOSS.TASK_SPECIFIC.TRAIN.FUNCS")
    enabled = by_key.get("LOSS.TAXONOMY_SMOOTHING.ENABLED")
    types: dict[str, str] = {}
    if funcs:
        values = _per_task_list(funcs, keys, errors)
        for task, name in zip(keys, values or [], strict=False):
            types[task] = name
            put(f"{heads_prefix}.{task}.LOSS.TYPE", name, funcs)
        findings.append(Finding(funcs.key, funcs.origin, f"read as {heads_prefix}.<task>.LOSS.TYPE; {MIGRATE_HINT}"))
    if enabled:
        values = _per_task_list(enabled, keys, errors)
        for task, on in zip(keys, values or [], strict=False):
            if on:
                types[task] = "TaxonomyAwareLabelSmoothing"
                put(f"{heads_prefix}.{task}.LOSS.TYPE", "TaxonomyAwareLabelSmoothing", enabled)
        findings.append(
            Finding(enabled.key, enabled.origin, f"read as {heads_prefix}.<task>.LOSS.TYPE; {MIGRATE_HINT}")
        )
    for name, param in (("LOSS.TAXONOMY_SMOOTHING.ALPHA", "alpha"), ("LOSS.TAXONOMY_SMOOTHING.BETA", "beta")):
        h = by_key.get(name)
        if not h:
            continue
        for task in keys:
            if types.get(task) == "TaxonomyAwareLabelSmoothing":
                put(f"{heads_prefix}.{task}.LOSS.PARAMS.{param}", h.value, h)
        findings.append(Finding(h.key, h.origin, f"read as {heads_prefix}.<task>.LOSS.PARAMS.{param}; {MIGRATE_HINT}"))
    weights = by_key.get("LOSS.GRAD_WEIGHTING.TASK.INIT_WEIGHTS")
    if weights and weights.value:
        values = _per_task_list(weights, keys, errors)
        for task, w in zip(keys, values or [], strict=False):
            put(f"{heads_prefix}.{task}.LOSS.WEIGHT", w, weights)
        findings.append(Finding(weights.key, weights.origin, f"read as {heads_prefix}.<task>.LOSS.WEIGHT"))
    elif weights:
        findings.append(Finding(weights.key, weights.origin, "ignored: empty; every LOSS.WEIGHT stays 1"))
    for name, target in (("LOSS.GRAD_WEIGHTING.CLASS.METHOD", "TYPE"), ("LOSS.GRAD_WEIGHTING.CLASS.CAP", "CAP")):
        h = by_key.get(name)
        if not h:
            continue
        values = _per_task_list(h, keys, errors) or []
        if len(set(map(repr, values))) > 1:
            errors.append(f"{h.key} (from {h.origin}): per-task values {values} differ; one LOSS.CLASS_WEIGHTING here")
            continue
        if values:
            put(f"LOSS.CLASS_WEIGHTING.{target}", values[0], h)
        findings.append(Finding(h.key, h.origin, f"read as LOSS.CLASS_WEIGHTING.{target}; {MIGRATE_HINT}"))
    return findings, errors, origins
