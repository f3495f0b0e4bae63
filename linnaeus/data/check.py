"""The data report behind ``linnaeus check``: every problem the data rules find, collected instead of raised.

:func:`build_report` runs every stage it can and lists all problems (one line each) rather than stopping at the
first: every schema problem of a labels file, every taxonomy conflict and inconsistency, every NUM_CLASSES
mismatch, every identifier that leaves the image folder, every missing or corrupt image. The rules themselves are
the ones training raises (:mod:`linnaeus.data.rules` and the modules it names), so the two never disagree. This
module prints nothing; the command (:mod:`linnaeus.commands.check`) prints the report and sets the exit code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from linnaeus.data.stages import MAX_LISTED, DataState, StageOptions, per_store, run_stages, split_targets
from linnaeus.data.taxonomy import rank_name
from linnaeus.errors import LinnaeusError
from linnaeus.specs.data import DataSpec

# Sections the data package cannot compute itself (it must not import models or shards): the command layer passes
# callables ``(num_classes, class_maps=...) -> dict | None`` (class maps as training builds them, so a section can do
# what training will); one raising LinnaeusError becomes one error line.
ExtraSection = Callable[..., Any]


# --------------------------------------------------------------------------------------------------- report
def _config_summary(spec: DataSpec, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "img_size": spec.crop.img_size,
        "task_keys": spec.task_keys,
        "batch_size": spec.loader.batch_size,
        "meta_active": spec.meta.active,
        "taxonomy_path": spec.labels.taxonomy_path,
    }


def build_report(
    spec: DataSpec,
    check_images: bool = True,
    decode: bool = False,
    extra: dict[str, ExtraSection] | None = None,
    model: str = "",
) -> dict[str, Any]:
    """Everything `linnaeus check` reports, as a JSON-serialisable dict; problems go to ``errors`` (one line each).

    ``model``: how the ``config`` section names the model (the command knows it; the data package does not)."""
    options = StageOptions(collect=True, check_images=check_images, decode=decode)
    state, sink = run_stages(spec, options)
    r: dict[str, Any] = {
        "ok": True,
        "errors": sink.errors,
        "warnings": sink.warnings,
        "config": _config_summary(spec, model),
        "labels": [],
        "split": None,
        "observations": [],
        "ranks": {},
        "metadata": {},
        "taxonomy": None,
        "images": state.image_report,
        "model": None,
    }
    if not state.views:  # the labels could not be read or split: nothing more to describe
        return _finish(r)
    _describe_labels(state, r)
    _describe_classes(state, r)
    images_at = state.warnings_before.get("split_image_paths", len(sink.warnings))
    r["warnings"][images_at:images_at] = _describe_metadata(state, r)  # before the image warnings, as listed
    for name, section in (extra or {}).items():
        try:
            r[name] = section({k: len(m) for k, m in state.class_maps.items()}, class_maps=state.class_maps)
            if isinstance(r[name], dict):  # a section may carry its own problems (e.g. a shard fingerprint)
                r["errors"].extend(r[name].get("errors", []))
                r["warnings"].extend(r[name].get("warnings", []))
        except LinnaeusError as exc:
            r["errors"].append(str(exc))
    return _finish(r)


def _describe_labels(state: DataState, r: dict[str, Any]) -> None:
    split = state.split
    assert split is not None
    for (store, _), rep in zip(per_store(state.views), state.reports, strict=True):
        r["labels"].append({**rep.to_dict(), "fingerprint": store.fingerprint, "duplicates": store.duplicates.count})
    r["split"] = {
        "train": len(split.train_rows),
        "val": len(split.val_rows),
        "seed": split.seed,
        "ratio": split.ratio,
        "presplit": split.presplit,
        "by": split.by,
        "stratify": split.stratify,
        "how": split.describe(),
    }
    r["observations"] = state.observations
    findings = state.findings
    if findings is not None:
        tree = findings.tree
        r["taxonomy"] = {
            "source": tree.source if tree else None,
            "nodes": len(tree) if tree else 0,
            "edges": len(tree.parent) if tree else 0,
            "conflicts": [c.to_dict() for _, c in findings.conflicts],
            "inconsistencies": [{"file": w, **i.to_dict()} for w, i in findings.inconsistencies],
        }


def _describe_classes(state: DataState, r: dict[str, Any]) -> None:
    labels = state.spec.labels
    targets = {v.name: split_targets(state.class_maps, v) for v in state.views}
    for key, cmap in state.class_maps.items():
        configured = labels.configured(key)
        train_counts = state.counts["train"][key]
        nulls = {name: int((t[key] < 0).sum()) for name, t in targets.items()}
        r["ranks"][key] = {
            "rank": rank_name(cmap.rank),
            "num_classes": len(cmap),
            "configured": configured[0][1] if configured else None,
            "nulls": nulls,
            "classes_without_train_rows": int((train_counts == 0).sum()),
            "min_train_count": int(train_counts.min()) if len(cmap) else 0,
            "max_train_count": int(train_counts.max()) if len(cmap) else 0,
        }


def _describe_metadata(state: DataState, r: dict[str, Any]) -> list[str]:
    """Fills the metadata section; returns its warnings (rows without any label)."""
    warnings = []
    keys = state.spec.task_keys
    for store, rows in per_store(state.views):
        stats = store.statistics(rows)
        for name, comp in stats["metadata"].items():
            r["metadata"].setdefault(name, []).append({"file": str(store.path), **comp})
            if stats["rows"] and comp["valid"] == 0:
                r["warnings"].append(
                    f"{store.path}: metadata component {name} ('{comp['source']}') is missing (NaN or zeros) on all"
                    f" {stats['rows']} rows in use; it adds nothing to training: fix the file, or set"
                    f" DATA.META.COMPONENTS.{name}.ENABLED false"
                )
        if stats["rows_all_ranks_null"]:
            warnings.append(
                f"{store.path}: {stats['rows_all_ranks_null']} rows have no label at any of {keys}"
                " (they add no loss; DATA.REQUIRE_ALL_RANKS would drop them)"
            )
    return warnings


def _finish(r: dict[str, Any]) -> dict[str, Any]:
    r["ok"] = not r["errors"]
    return r


__all__ = ["MAX_LISTED", "ExtraSection", "build_report"]
