"""``linnaeus check``: print the data report (:func:`linnaeus.data.check.build_report`) as a table or JSON, with
one ``error: ...`` line per problem on stderr and exit code 2 when there is any; plus the sections that need the
model or shards, which the data package must not import. Bad input never produces a traceback.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from typing import Any

from linnaeus.config import Config
from linnaeus.data.taxonomy import keys_coarse_to_fine
from linnaeus.errors import ConfigError, DataError

SIZE_RESOLUTIONS = (224, 384)


def _any_tree(parents: int, children: int):
    import torch

    h = torch.zeros(parents, children)
    h[torch.arange(children) % parents, torch.arange(children)] = 1.0
    return h


def model_section(cfg: Config, num_classes: dict[str, int], class_maps: Any = None) -> dict[str, Any]:
    """Measured (not documented) size: parameters, and GMACs at 224 and 384 px for one image."""
    import torch

    from linnaeus.config.resolve_data import meta_spec
    from linnaeus.config.resolve_model import model_spec
    from linnaeus.models import HierarchicalClassifier, build_backbone, coarse_to_fine, model_size
    from linnaeus.models.builder import resolve_head_specs

    meta_dims = meta_spec(cfg).dims
    keys = list(cfg.DATA.TASK_KEYS_H5)
    order = coarse_to_fine(keys)
    # Which parent each child has does not change the size; any valid tree of the right shape will do.
    shapes = {(p, c): _any_tree(num_classes[p], num_classes[c]) for p, c in itertools.pairwise(order)}
    spec = model_spec(cfg)
    with torch.device("meta"):  # the backbone can be large; count it without allocating memory
        num_features = build_backbone(spec, meta_dims).num_features
    heads = HierarchicalClassifier(num_features, keys, num_classes, resolve_head_specs(spec, keys, num_classes), shapes)
    head_params = sum(p.numel() for p in heads.parameters())
    sizes = {px: model_size(spec, meta_dims, px) for px in (*SIZE_RESOLUTIONS, spec.img_size)}
    backbone = sizes[SIZE_RESOLUTIONS[0]]
    return {
        "name": cfg.MODEL.NAME,
        "params": backbone["params"] + head_params,
        "backbone_params": backbone["params"],
        "meta_params": backbone["meta_params"],
        "head_params": head_params,
        "gmacs": {str(px): round(s["gmacs"], 3) for px, s in sorted(sizes.items())},
    }


def losses_section(cfg: Config, num_classes: dict[str, int], class_maps: Any = None) -> dict[str, Any]:
    """Each head's loss, with its PARAMS validated by the same code training uses."""
    from linnaeus.config.resolve_model import loss_spec
    from linnaeus.losses.task_loss import loss_config_problems

    heads = cfg.MODEL.CLASSIFICATION.HEADS
    types = {k: heads[k].LOSS.TYPE if k in heads else "CrossEntropyLoss" for k in cfg.DATA.TASK_KEYS_H5}
    return {"types": types, "errors": loss_config_problems(loss_spec(cfg), cfg.DATA.TASK_KEYS_H5)}


def pretrained_section(cfg: Config, num_classes: dict[str, int], class_maps: Any = None) -> dict[str, Any] | None:
    """What each MODEL.PRETRAINED* file gives the model, per group, with every skipped tensor and its reason.

    The model is built for real on the CPU (the weights must be read to be checked), with this dataset's class maps,
    so head rows of a previous Linnaeus model are matched by taxon id here exactly as at training start.
    """
    from linnaeus.config.resolve_model import model_spec
    from linnaeus.models.pretrained import pretrained_source

    spec = model_spec(cfg)
    if pretrained_source(spec) is None:
        return None
    from linnaeus.config.resolve_data import meta_spec
    from linnaeus.models import build_model, coarse_to_fine

    keys = list(cfg.DATA.TASK_KEYS_H5)
    order = coarse_to_fine(keys)
    shapes = {(p, c): _any_tree(num_classes[p], num_classes[c]) for p, c in itertools.pairwise(order)}
    meta_dims = meta_spec(cfg).dims
    report = build_model(spec, keys, num_classes, meta_dims, shapes, class_maps=class_maps).pretrained_report
    return {**report.to_json(), "lines": report.lines()}


def shards_section(cfg: Config, num_classes: dict[str, int], class_maps: Any = None) -> dict[str, Any] | None:
    if not cfg.DATA.SHARDS.ENABLED:
        return None
    from linnaeus.config.resolve_data import data_spec
    from linnaeus.data.shards import shard_report

    return shard_report(data_spec(cfg))


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
        lines.append(f"split: train {s['train']}, val {s['val']} ({s['how']})")
    for o in r.get("observations", []):
        extra = f"; {o['disagreeing']} disagree (warnings)" if o["disagreeing"] else ""
        lines.append(f"observations: {o['path']}: {o['line']}{extra}")
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
    if isinstance(r.get("pretrained"), dict):
        lines.extend(r["pretrained"]["lines"])
    if isinstance(r.get("shards"), dict):
        lines.append(
            "shards: " + ", ".join(f"{k} {v}" for k, v in r["shards"].items() if not isinstance(v, dict | list))
        )
    for w in r["warnings"]:
        lines.append(f"warning: {w}")
    n = len(r["errors"])
    lines.append("result: OK" if r["ok"] else f"result: {n} error{'s' if n > 1 else ''} (listed on stderr)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``linnaeus check --cfg X [--opts ...] [--json] [--no-images] [--decode-images]``."""
    from linnaeus.config import compat, load_config_with_provenance
    from linnaeus.config.loader import problems_of
    from linnaeus.config.resolve import batch_fill_problem
    from linnaeus.config.resolve_data import data_spec
    from linnaeus.data.check import build_report
    from linnaeus.engine.arch_from_weights import follow_pretrained_weights

    try:
        cfg, prov = load_config_with_provenance(args.cfg, args.opts)
    except ConfigError as err:
        if not args.json:
            raise  # printed as one line by the CLI
        print(json.dumps({"ok": False, "errors": problems_of(err), "warnings": []}, indent=2))
        return err.exit_code
    follow_pretrained_weights(cfg)  # the architecture training will build (LayerScale when the stitched ViT has it)
    sections = {
        "losses": losses_section,
        "model": model_section,
        "pretrained": pretrained_section,
        "shards": shards_section,
    }
    extra = {name: functools.partial(section, cfg) for name, section in sections.items()}
    report = build_report(
        data_spec(cfg),
        check_images=not args.no_images,
        decode=args.decode_images,
        extra=extra,
        model=f"{cfg.MODEL.TYPE} ({cfg.MODEL.NAME})",
    )
    split = report.get("split")
    if split is not None:  # what training will refuse once it has read the data (with one process at least)
        problem = batch_fill_problem(split["train"], cfg.DATA.BATCH_SIZE, 1)
        if problem is not None:
            report["errors"].append(problem)
            report["ok"] = False
    summary = None if args.json else compat.summary_line(prov.findings)
    report["warnings"][:0] = [summary] if summary is not None else prov.warnings
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    sys.stdout.flush()
    for line in report["errors"]:
        print(f"error: {line}", file=sys.stderr)
    return 0 if report["ok"] else DataError.exit_code
