"""``linnaeus check``: validate config, labels.h5, taxonomy and images without training; and image verification.

:func:`build_report` runs every stage it can and collects problems instead of stopping at the first: all schema
problems of a labels file, every taxonomy conflict and inconsistency, every NUM_CLASSES mismatch, every missing or
corrupt image. :func:`run` prints the report (a table, or JSON with ``--json``), then one ``error: ...`` line per
problem on stderr, and exits 2 when there is any. Bad input never produces a traceback.

Missing/corrupt images (here and in ``DATA.HYBRID.VERIFY_IMAGES``): without ``DATA.HYBRID.ALLOW_MISSING_IMAGES``
any unreadable image is an error naming the file and its labels.h5 row, unless it is within the VERIFY_IMAGES limit
``max(MAX_MISSING_COUNT, floor(MAX_MISSING_RATIO × images checked))``: then its row is left out of training (the
prior system's behaviour). With ``ALLOW_MISSING_IMAGES`` unreadable images up to that limit are kept, replaced and
counted. A limit of 0 means none (it never means "unlimited").
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from linnaeus.data.labels import components_from_config, in_region_key, inspect_labels
from linnaeus.data.prepare import (
    SplitView,
    build_class_maps,
    examine_taxonomy,
    image_path,
    label_paths,
    make_split,
    num_classes_problems,
    per_store,
    resolve_path,
    used_taxa,
)
from linnaeus.data.taxonomy import keys_coarse_to_fine, rank_name, rank_of_key
from linnaeus.errors import ConfigError, DataError, LinnaeusError
from linnaeus.utils.io import atomic_write_json

if TYPE_CHECKING:
    import argparse

    from linnaeus.config import Config
    from linnaeus.config.defaults import VerifyImagesConfig

MAX_LISTED = 100  # image problems listed in a report printed by `linnaeus check` (all are counted)


# ----------------------------------------------------------------------------------------- extra sections
# Sections the data package cannot compute itself (it must not import models or shards): the command layer passes
# callables ``(cfg, num_classes) -> dict | None``; one raising LinnaeusError becomes one error line.
ExtraSection = Callable[..., Any]


# --------------------------------------------------------------------------------------------------- images
def _probe(path: str, decode: bool) -> str | None:
    """None when the image is fine, else a short description of the problem."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if size == 0:
        return "is empty (0 bytes)"
    if not decode:
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale; still reads every entropy-coded block
            im.load()
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        return f"cannot be decoded ({type(exc).__name__}: {exc})"
    return None


def scan_images(paths: Sequence[str], *, decode: bool = False, workers: int = 8) -> list[tuple[int, str]]:
    """(index, problem) for every unreadable path, in index order. Threads: stat/open/decode release the GIL."""
    n = len(paths)
    if not n:
        return []
    chunk = max(1, min(2048, math.ceil(n / (workers * 8))))

    def work(start: int) -> list[tuple[int, str]]:
        out = []
        for i in range(start, min(n, start + chunk)):
            problem = _probe(paths[i], decode)
            if problem:
                out.append((i, problem))
        return out

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(work, range(0, n, chunk))
        return [item for part in results for item in part]


def verify_images(
    paths: Sequence[str],
    rows: np.ndarray,
    identifiers: Sequence[str],
    cfg_verify: VerifyImagesConfig,
    report_path: Path | None,
    *,
    allow_missing: bool = False,
    decode: bool | None = None,
    raise_on_error: bool = True,
) -> dict[str, Any]:
    """Check that every image exists (and decodes, with DECODE); write a JSON report; enforce the limits.

    Returns the report dict (``ok``, ``error``, counts, ``items`` = every problem with row/identifier/path).
    With ``raise_on_error`` a failed check raises DataError with the report's one-line ``error``.
    """
    decode = cfg_verify.DECODE if decode is None else decode
    n = len(paths)
    found = scan_images(paths, decode=decode, workers=cfg_verify.NUM_WORKERS)
    items = [
        {"row": int(rows[i]), "identifier": str(identifiers[i]), "path": str(paths[i]), "problem": p} for i, p in found
    ]
    missing = sum(1 for _, p in found if p == "does not exist")
    bad = len(found)
    limit = max(cfg_verify.MAX_MISSING_COUNT, math.floor(cfg_verify.MAX_MISSING_RATIO * n + 1e-9))
    error = None
    excluded: list[dict[str, Any]] = []
    if bad and not allow_missing and bad <= limit:
        excluded = items  # within VERIFY_IMAGES' limits: these rows are left out of training (as Polli Linnaeus did)
    elif bad and not allow_missing:
        first = items[0]
        error = (
            f"image {first['path']} (labels.h5 row {first['row']}) {first['problem']}; {bad} of {n} images are"
            " missing or unreadable; fix them, or set DATA.HYBRID.ALLOW_MISSING_IMAGES True and"
            " DATA.HYBRID.VERIFY_IMAGES.MAX_MISSING_COUNT/MAX_MISSING_RATIO to replace and count them (or set only"
            " the limits to leave those rows out)"
        )
    elif bad > limit:
        first = items[0]
        error = (
            f"{bad} of {n} images are missing or unreadable (first: {first['path']}, labels.h5 row {first['row']},"
            f" {first['problem']}), more than DATA.HYBRID.VERIFY_IMAGES allows: max(MAX_MISSING_COUNT"
            f" {cfg_verify.MAX_MISSING_COUNT}, MAX_MISSING_RATIO {cfg_verify.MAX_MISSING_RATIO} x {n}) = {limit}"
        )
    report = {
        "ok": error is None,
        "error": error,
        "checked": n,
        "decoded": bool(decode),
        "missing": missing,
        "corrupt": bad - missing,
        "unreadable_ratio": round(bad / n, 6) if n else 0.0,
        "allow_missing": bool(allow_missing),
        "limit": limit,
        "excluded_rows": len(excluded),
        "report_path": str(report_path) if report_path else None,
        "items": items,
    }
    if report_path is not None:
        atomic_write_json(Path(report_path), report)
    if error and report_path is not None:
        report["error"] = error = f"{error} (full list: {report_path})"
    if error and raise_on_error:
        raise DataError(error)
    return report


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
    try:
        for key in keys:
            rank_of_key(key)
        train_path, val_path = label_paths(cfg)
    except LinnaeusError as exc:
        errors.append(str(exc))
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
    if not len(split.val_rows):
        r["warnings"].append("the validation split is empty (DATA.H5.TRAIN_VAL_SPLIT_RATIO leaves no rows)")

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

    where = ", ".join(str(s.path) for s, _ in per_store(views))
    class_maps = build_class_maps(keys, used_taxa(views, keys), tree)
    errors.extend(num_classes_problems(cfg, class_maps, where))
    heads = cfg.MODEL.CLASSIFICATION.HEADS
    per_level = cfg.DATA.NUM_CLASSES_PER_LEVEL or {}
    for key in keys:
        cmap = class_maps[key]
        configured = (
            heads[key].NUM_CLASSES if key in heads and heads[key].NUM_CLASSES is not None else per_level.get(key)
        )
        idx = {v.name: cmap.index(v.store.taxa[key][v.rows]) for v in views}
        train_counts = np.bincount(idx["train"][idx["train"] >= 0], minlength=len(cmap))
        r["ranks"][key] = {
            "rank": rank_name(cmap.rank),
            "num_classes": len(cmap),
            "configured": configured,
            "nulls": {name: int((i < 0).sum()) for name, i in idx.items()},
            "classes_without_train_rows": int((train_counts == 0).sum()),
            "min_train_count": int(train_counts.min()) if len(cmap) else 0,
            "max_train_count": int(train_counts.max()) if len(cmap) else 0,
        }
        if not len(cmap):
            errors.append(f"{where}: {key} has no non-null taxon ids in the rows in use; nothing to train at that rank")

    for store, rows in per_store(views):
        stats = store.statistics(rows)
        for name, comp in stats["metadata"].items():
            r["metadata"].setdefault(name, []).append({"file": str(store.path), **comp})
        if stats["rows_all_ranks_null"]:
            r["warnings"].append(
                f"{store.path}: {stats['rows_all_ranks_null']} rows have no label at any of {keys}"
                " (they add no loss; DATA.REQUIRE_ALL_RANKS would drop them)"
            )

    if check_images:
        _check_images(cfg, views, decode, r)
    for name, section in (extra or {}).items():
        try:
            r[name] = section(cfg, {k: len(m) for k, m in class_maps.items()})
            if isinstance(r[name], dict):  # a section may carry its own problems (e.g. a shard fingerprint)
                errors.extend(r[name].get("errors", []))
                r["warnings"].extend(r[name].get("warnings", []))
        except LinnaeusError as exc:
            errors.append(str(exc))
    return _finish(r)


def _check_images(cfg: Config, views: list[SplitView], decode: bool, r: dict[str, Any]) -> None:
    hybrid = cfg.DATA.HYBRID
    if not hybrid.IMAGES_DIR:
        if cfg.DATA.SHARDS.ENABLED:
            r["warnings"].append("images not checked: DATA.HYBRID.IMAGES_DIR is not set (training reads shards)")
        else:
            r["errors"].append("DATA.HYBRID.IMAGES_DIR: not set; expected the folder holding the images")
        return
    images_dir = resolve_path(hybrid.IMAGES_DIR)
    if not images_dir.is_dir():
        r["errors"].append(f"DATA.HYBRID.IMAGES_DIR: {images_dir} is not a directory")
        return
    paths, rows, ids = [], [], []
    for v in views:
        vid = v.store.identifiers[v.rows]
        paths += [image_path(str(images_dir), i, hybrid.FILE_EXTENSION) for i in vid]
        rows.append(v.rows)
        ids.append(vid)
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


# ------------------------------------------------------------------------------------------------- printing
def _table(rows: list[list[Any]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def format_report(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [f"config: OK — {c['model']}, image {c['img_size']} px, task keys {', '.join(c['task_keys'])}"]
    for lab in r["labels"]:
        lines.append(f"labels: {lab['path']}")
        lines.append(f"  rows {lab['rows_total']}, kept {lab['rows_kept']}, fingerprint {lab['fingerprint'][:16]}")
        for f in lab["filters"]:
            lines.append(f"  filter {f['name']} ({f['key']}): dropped {f['dropped']}")
        if lab["duplicates"]:
            lines.append(f"  duplicate identifiers: {lab['duplicates']} rows")
    if r["split"]:
        s = r["split"]
        how = "pre-split files" if s["presplit"] else f"seed {s['seed']}, ratio {s['ratio']}"
        lines.append(f"split: train {s['train']}, val {s['val']} ({how})")
    if r["ranks"]:
        lines.append("ranks:")
        order = keys_coarse_to_fine(r["ranks"]) if r["ranks"] else []
        table = [["key", "rank", "classes", "config", "nulls train/val", "no train rows", "train count min/max"]]
        for key in order:
            k = r["ranks"][key]
            table.append(
                [
                    key,
                    k["rank"],
                    k["num_classes"],
                    "-" if k["configured"] is None else k["configured"],
                    f"{k['nulls']['train']}/{k['nulls']['val']}",
                    k["classes_without_train_rows"],
                    f"{k['min_train_count']}/{k['max_train_count']}",
                ]
            )
        lines += _table(table)
    if r["metadata"]:
        lines.append("metadata:")
        table = [["component", "source", "from", "dim", "idx", "coverage", "missing", "oor masked"]]
        for name, per_file in r["metadata"].items():
            for m in per_file:
                table.append(
                    [
                        name,
                        m["source"],
                        m["origin"],
                        m["dim"],
                        m["idx"],
                        f"{100 * m['coverage']:.1f}%",
                        m["missing"],
                        m["oor_masked"],
                    ]
                )
        lines += _table(table)
    t = r["taxonomy"]
    if t:
        lines.append(
            f"taxonomy: {t['source']}: {t['nodes']} taxa, {t['edges']} edges; {len(t['conflicts'])} conflicts,"
            f" {sum(i['rows'] for i in t['inconsistencies'])} inconsistent rows"
        )
    im = r["images"]
    if im:
        how = "decoded" if im["decoded"] else "existence checked"
        lines.append(f"images: {im['checked']} {how}; {im['missing']} missing, {im['corrupt']} corrupt")
    if isinstance(r.get("model"), dict):
        m = r["model"]
        macs = ", ".join(f"{g:.2f} GMACs at {px}" for px, g in m["gmacs"].items())
        lines.append(
            f"model: {m['name']}: {m['params'] / 1e6:.2f} M parameters ({m['backbone_params'] / 1e6:.2f} M backbone"
            f" incl. {m['meta_params'] / 1e6:.2f} M metadata embedders, {m['head_params'] / 1e6:.2f} M heads); {macs}"
        )
    if isinstance(r.get("shards"), dict):
        lines.append(
            "shards: " + ", ".join(f"{k} {v}" for k, v in r["shards"].items() if not isinstance(v, dict | list))
        )
    for w in r["warnings"]:
        lines.append(f"warning: {w}")
    n = len(r["errors"])
    lines.append("result: OK" if r["ok"] else f"result: {n} error{'s' if n > 1 else ''} (listed on stderr)")
    return "\n".join(lines)


def run(args: argparse.Namespace, extra: dict[str, ExtraSection] | None = None) -> int:
    """``linnaeus check --cfg X [--opts ...] [--json] [--no-images] [--decode-images]``."""
    from linnaeus.config import load_config_with_provenance
    from linnaeus.config.loader import problems_of

    try:
        cfg, prov = load_config_with_provenance(args.cfg, args.opts)
    except ConfigError as err:
        if not args.json:
            raise  # printed as one line by the CLI
        print(json.dumps({"ok": False, "errors": problems_of(err), "warnings": []}, indent=2))
        return err.exit_code
    report = build_report(cfg, check_images=not args.no_images, decode=args.decode_images, extra=extra)
    report["warnings"][:0] = prov.warnings
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    sys.stdout.flush()
    for line in report["errors"]:
        print(f"error: {line}", file=sys.stderr)
    return 0 if report["ok"] else DataError.exit_code
