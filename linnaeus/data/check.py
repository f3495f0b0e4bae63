"""The data report behind ``linnaeus check``: every problem the data rules find, collected instead of raised.

:func:`build_report` runs every stage it can and lists all problems (one line each) rather than stopping at the
first: every schema problem of a labels file, every taxonomy conflict and inconsistency, every NUM_CLASSES
mismatch, every identifier that leaves the image folder, every missing or corrupt image. The rules themselves are
the ones training raises (:mod:`linnaeus.data.rules` and the modules it names), so the two never disagree. This
module prints nothing; the command (:mod:`linnaeus.commands.check`) prints the report and sets the exit code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from linnaeus.data.labels import components_from_config, in_region_key, inspect_labels
from linnaeus.data.paths import images_dir_problem, label_paths
from linnaeus.data.prepare import (
    SplitView,
    build_class_maps,
    examine_taxonomy,
    make_split,
    per_store,
    split_image_paths,
    used_taxa,
    where_rows,
)
from linnaeus.data.rules import (
    configured_num_classes,
    empty_rank_problems,
    num_classes_problems,
    split_problems,
    storage_problems,
    task_key_problems,
)
from linnaeus.data.taxonomy import rank_name
from linnaeus.data.verify_images import verify_images
from linnaeus.errors import LinnaeusError

if TYPE_CHECKING:
    from linnaeus.config import Config

MAX_LISTED = 100  # image problems listed in a report (all are counted)

# Sections the data package cannot compute itself (it must not import models or shards): the command layer passes
# callables ``(cfg, num_classes, class_maps=...) -> dict | None`` (class maps as training builds them, so a section
# can do what training will); one raising LinnaeusError becomes one error line.
ExtraSection = Callable[..., Any]


# --------------------------------------------------------------------------------------------------- report
def _config_summary(cfg: Config) -> dict[str, Any]:
    return {
        "model": f"{cfg.MODEL.TYPE} ({cfg.MODEL.NAME})",
        "img_size": cfg.DATA.IMG_SIZE,
        "task_keys": list(cfg.DATA.TASK_KEYS_H5),
        "batch_size": cfg.DATA.BATCH_SIZE,
        "meta_active": cfg.DATA.META.ACTIVE,
        "taxonomy_path": cfg.DATA.TAXONOMY_PATH,
    }


def build_report(
    cfg: Config, check_images: bool = True, decode: bool = False, extra: dict[str, ExtraSection] | None = None
) -> dict[str, Any]:
    """Everything `linnaeus check` reports, as a JSON-serialisable dict; problems go to ``errors`` (one line each)."""
    r: dict[str, Any] = {
        "ok": True,
        "errors": [],
        "warnings": [],
        "config": _config_summary(cfg),
        "labels": [],
        "split": None,
        "ranks": {},
        "metadata": {},
        "taxonomy": None,
        "images": None,
        "model": None,
    }
    errors: list[str] = r["errors"]
    keys = list(cfg.DATA.TASK_KEYS_H5)
    errors.extend(map(str, storage_problems(cfg) + task_key_problems(cfg)))
    try:
        train_path, val_path = label_paths(cfg)
    except LinnaeusError as exc:
        errors.append(str(exc))
    if errors:
        return _finish(r)

    comps = components_from_config(cfg)
    stores = []
    for path in [train_path] + ([val_path] if val_path else []):
        store, problems = inspect_labels(path, keys, comps, in_region_key(cfg))
        errors.extend(problems)
        stores.append(store)
    if errors:
        return _finish(r)
    train_store, val_store = stores[0], stores[-1]
    try:
        split, reports = make_split(cfg, train_store, val_store)
    except LinnaeusError as exc:
        errors.append(str(exc))
        return _finish(r)
    for store, rep in zip(stores, reports, strict=True):
        r["labels"].append({**rep.to_dict(), "fingerprint": store.fingerprint, "duplicates": store.duplicates.count})
        if store.duplicates.count:
            r["warnings"].append(store.duplicates.line(store.path))
    views = [SplitView("train", train_store, split.train_rows), SplitView("val", val_store, split.val_rows)]
    r["split"] = {
        "train": len(split.train_rows),
        "val": len(split.val_rows),
        "seed": split.seed,
        "ratio": split.ratio,
        "presplit": split.presplit,
    }
    errors.extend(map(str, split_problems(split)))

    tree = None
    try:
        findings = examine_taxonomy(cfg, views)
        tree = None if findings.conflicts else findings.tree
        r["taxonomy"] = {
            "source": findings.tree.source if findings.tree else None,
            "nodes": len(findings.tree) if findings.tree else 0,
            "edges": len(findings.tree.parent) if findings.tree else 0,
            "conflicts": [c.to_dict() for _, c in findings.conflicts],
            "inconsistencies": [{"file": w, **i.to_dict()} for w, i in findings.inconsistencies],
        }
        errors.extend(findings.lines())
    except LinnaeusError as exc:
        errors.append(str(exc))

    where = where_rows(views)
    class_maps = build_class_maps(keys, used_taxa(views, keys), tree)
    errors.extend(map(str, num_classes_problems(cfg, class_maps, where) + empty_rank_problems(class_maps, where)))
    for key in keys:
        cmap = class_maps[key]
        configured = configured_num_classes(cfg, key)
        idx = {v.name: cmap.index(v.store.taxa[key][v.rows]) for v in views}
        train_counts = np.bincount(idx["train"][idx["train"] >= 0], minlength=len(cmap))
        r["ranks"][key] = {
            "rank": rank_name(cmap.rank),
            "num_classes": len(cmap),
            "configured": configured[0][1] if configured else None,
            "nulls": {name: int((i < 0).sum()) for name, i in idx.items()},
            "classes_without_train_rows": int((train_counts == 0).sum()),
            "min_train_count": int(train_counts.min()) if len(cmap) else 0,
            "max_train_count": int(train_counts.max()) if len(cmap) else 0,
        }

    for store, rows in per_store(views):
        stats = store.statistics(rows)
        for name, comp in stats["metadata"].items():
            r["metadata"].setdefault(name, []).append({"file": str(store.path), **comp})
        if stats["rows_all_ranks_null"]:
            r["warnings"].append(
                f"{store.path}: {stats['rows_all_ranks_null']} rows have no label at any of {keys}"
                " (they add no loss; DATA.REQUIRE_ALL_RANKS would drop them)"
            )

    _check_images(cfg, views, check_images, decode, r)
    for name, section in (extra or {}).items():
        try:
            r[name] = section(cfg, {k: len(m) for k, m in class_maps.items()}, class_maps=class_maps)
            if isinstance(r[name], dict):  # a section may carry its own problems (e.g. a shard fingerprint)
                errors.extend(r[name].get("errors", []))
                r["warnings"].extend(r[name].get("warnings", []))
        except LinnaeusError as exc:
            errors.append(str(exc))
    return _finish(r)


def _check_images(cfg: Config, views: list[SplitView], verify: bool, decode: bool, r: dict[str, Any]) -> None:
    """Identifiers that leave IMAGES_DIR (always, as training refuses them), then, with ``verify``, the images."""
    hybrid = cfg.DATA.HYBRID
    problem = images_dir_problem(cfg)
    if problem and verify:  # shards or not: validation always reads the image files
        r["errors"].append(problem)
    if not hybrid.IMAGES_DIR or (problem and verify):
        return
    paths, rows, ids = [], [], []
    for v in views:
        split_paths, refused = split_image_paths(cfg, v)
        r["errors"].extend(refused.values())
        keep = np.setdiff1d(np.arange(len(v.rows)), np.fromiter(refused, np.int64))  # a refused path is never opened
        paths += [split_paths[j] for j in keep]
        rows.append(v.rows[keep])
        ids.append(v.store.identifiers[v.rows[keep]])
    if not verify:
        return
    report = verify_images(
        paths,
        np.concatenate(rows),
        np.concatenate(ids),
        hybrid.VERIFY_IMAGES,
        None,
        allow_missing=hybrid.ALLOW_MISSING_IMAGES,
        decode=decode or hybrid.VERIFY_IMAGES.DECODE,
        raise_on_error=False,
    )
    report["items"] = report["items"][:MAX_LISTED]
    r["images"] = report
    if report["error"]:
        r["errors"].append(report["error"])
    elif report["excluded_rows"]:
        r["warnings"].append(
            f"{report['excluded_rows']} rows with missing or corrupt images will be left out of training"
            " (within DATA.HYBRID.VERIFY_IMAGES' MAX_MISSING_COUNT/MAX_MISSING_RATIO)"
        )
    elif report["missing"] or report["corrupt"]:
        r["warnings"].append(
            f"{report['missing']} missing and {report['corrupt']} corrupt images will be replaced and counted"
            " (DATA.HYBRID.ALLOW_MISSING_IMAGES)"
        )


def _finish(r: dict[str, Any]) -> dict[str, Any]:
    r["ok"] = not r["errors"]
    return r


__all__ = ["MAX_LISTED", "ExtraSection", "build_report"]
