"""The end-of-run report: a pure function of the run folder (plus timing facts only the live trainer knows).

``write_report(run)`` reads ``metrics.jsonl``, ``config.yaml``, ``checkpoints/`` and ``export/`` and writes
``report.json`` and a self-contained ``report.html`` (plots embedded as PNG data URIs) into the run folder, then returns
a short console summary. It works on any run folder, finished, crashed or still going.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from linnaeus.engine.run_metrics import (
    METRICS_FILE,
    VAL,
    VAL_MASKED,
    finite,
    metadata_gaps,
    rank_labels,
    read_metrics,
    rows_of,
    task_keys_of,
)
from linnaeus.utils.io import atomic_write_json, atomic_write_text

DEFAULT_BEST_METRIC = "val/chain_accuracy"


def _read_config(run: Path) -> dict[str, Any]:
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


def _best_rule(config: Mapping[str, Any]) -> tuple[str, str]:
    ckpt = (config.get("SCHEDULE") or {}).get("CHECKPOINT") or {}
    return str(ckpt.get("BEST_METRIC") or DEFAULT_BEST_METRIC), str(ckpt.get("BEST_MODE") or "max")


def best_of(rows: Iterable[Mapping[str, Any]], metric: str, mode: str) -> tuple[float, int] | None:
    """(best value, its step) of a phase-prefixed metric such as ``val/chain_accuracy``; ties keep the earliest."""
    phase, _, key = metric.partition("/")
    found: tuple[float, int] | None = None
    for r in rows_of(rows, phase):
        v = r.get(key)
        if not finite(v):
            continue
        better = found is None or (v > found[0] if mode == "max" else v < found[0])
        if better:
            found = (float(v), int(r["step"]))
    return found


# ------------------------------------------------------------------------------------------------ the report
@dataclass
class Timings:
    """What only the live trainer measures; every field optional (a report rebuilt from files has none)."""

    total_seconds: float | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)  # e.g. setup, train, validation, checkpoint, export
    mean_images_per_sec: float | None = None
    data_wait_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_seconds": self.total_seconds,
            "phase_seconds": dict(self.phase_seconds),
            "mean_images_per_sec": self.mean_images_per_sec,
            "data_wait_share": self.data_wait_share,
        }


def _rank_table(val_rows: list[Mapping[str, Any]], keys: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    final = val_rows[-1] if val_rows else {}
    for key in keys:
        entry: dict[str, Any] = {}
        for m in ("top1", "top5"):
            name = f"{key}/{m}"
            entry[f"final_{m}"] = final.get(name)
            best = None
            vals = [(float(r[name]), int(r["step"])) for r in val_rows if finite(r.get(name))]
            if vals:
                best = max(vals, key=lambda t: (t[0], -t[1]))
            entry[f"best_{m}"] = None if best is None else best[0]
            entry[f"best_{m}_step"] = None if best is None else best[1]
        out[key] = entry
    return out


def build_report(run: Path, timings: Timings | None = None) -> dict[str, Any]:
    """Everything the report says, as plain JSON-able data."""
    run = Path(run)
    rows = read_metrics(run / METRICS_FILE)
    config = _read_config(run)
    metric, mode = _best_rule(config)
    val_rows = list(rows_of(rows, VAL))
    masked_rows = list(rows_of(rows, VAL_MASKED))
    train_rows = list(rows_of(rows, "train"))
    keys = task_keys_of(val_rows) or [
        k[: -len("/loss")] for k in (train_rows[-1] if train_rows else {}) if k.endswith("/loss")
    ]
    best = best_of(rows, metric, mode)
    chain = [(float(r["chain_accuracy"]), int(r["step"])) for r in val_rows if finite(r.get("chain_accuracy"))]
    export = run / "export"
    weights = {
        name: str(export / f"{name}.safetensors")
        for name in ("best", "final")
        if (export / f"{name}.safetensors").is_file()
    }
    checkpoints = sorted(
        (p.name for p in (run / "checkpoints").glob("step_*") if p.is_dir()),
        key=lambda n: int(n.split("_")[1]) if n.split("_")[1].isdigit() else -1,
    )
    return {
        "run": str(run),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "last_step": int(rows[-1]["step"]) if rows else None,
        "task_keys": keys,
        "rank_labels": rank_labels(run, keys),
        "setup": run_setup(run, config),
        "ranking": {
            "metric": metric,
            "mode": mode,
            "best": None if best is None else best[0],
            "best_step": None if best is None else best[1],
        },
        "final_train_loss": train_rows[-1].get("loss") if train_rows else None,
        "validations": len(val_rows),
        "ranks": _rank_table(val_rows, keys),
        "chain_accuracy": {
            "final": chain[-1][0] if chain else None,
            "best": max(chain, key=lambda t: (t[0], -t[1]))[0] if chain else None,
            "best_step": max(chain, key=lambda t: (t[0], -t[1]))[1] if chain else None,
        },
        "metadata_masked_gap": _masked_gap(val_rows, masked_rows, keys),
        "timings": _timings(rows, train_rows, timings),
        "weights": weights,
        "checkpoints": checkpoints,
        "export_command": f"linnaeus export --run {run} --out {run / 'bundle'}",
    }


def _masked_gap(
    val_rows: list[Mapping[str, Any]], masked_rows: list[Mapping[str, Any]], keys: list[str]
) -> dict[str, Any]:
    """Validation with metadata minus validation with it masked, at the last step where both ran."""
    steps, gaps = metadata_gaps(val_rows, masked_rows, keys)
    if not steps:
        return {}
    return {"step": steps[-1]} | {k: v[-1] for k, v in gaps.items() if finite(v[-1])}


def _timings(
    rows: list[dict[str, Any]], train_rows: list[Mapping[str, Any]], timings: Timings | None
) -> dict[str, Any]:
    """The trainer's timings, completed from ``metrics.jsonl`` where the trainer gave none (a report rebuilt from
    files alone)."""
    ips = [float(r["images_per_sec"]) for r in train_rows if finite(r.get("images_per_sec"))]
    timing = (timings or Timings()).to_dict()
    if timing["mean_images_per_sec"] is None and ips:
        timing["mean_images_per_sec"] = sum(ips) / len(ips)
    if timing["total_seconds"] is None and rows and finite(rows[0].get("time")) and finite(rows[-1].get("time")):
        # From files alone: first to last metrics row (setup before the first row is not counted).
        timing["total_seconds_from_metrics"] = float(rows[-1]["time"]) - float(rows[0]["time"])
    return timing


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, Mapping) else None
    return tree


def run_setup(run: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """What was trained on what, in a few rows (dataset, model, training): the top of report.html."""
    rows: dict[str, str] = {}
    stats: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        stats = json.loads((Path(run) / "stats.json").read_text())
    name = " ".join(str(v) for v in (_get(config, "DATA.DATASET.NAME"), _get(config, "DATA.DATASET.VERSION")) if v)
    labels = [str(f.get("path")) for f in stats.get("labels", []) if isinstance(f, Mapping)]
    labels = labels or [
        str(v) for v in (_get(config, "DATA.H5.LABELS_PATH"), _get(config, "DATA.H5.TRAIN_LABELS_PATH")) if v
    ]
    splits = stats.get("splits", {})
    sizes = ", ".join(f"{s} {splits[s]['rows']}" for s in ("train", "val") if isinstance(splits.get(s), Mapping))
    rows["dataset"] = "; ".join(x for x in (name, ", ".join(labels), sizes and f"rows: {sizes}") if x) or "-"
    num = stats.get("num_classes") or {}
    keys = list(num) or list(_get(config, "DATA.TASK_KEYS_H5") or [])
    labelled = rank_labels(run, keys)
    if num:
        rows["classes"] = ", ".join(f"{labelled[k]}: {num[k]}" for k in keys)
    meta = _get(config, "DATA.META.COMPONENTS") or {}
    active = [k for k, v in meta.items() if isinstance(v, Mapping) and v.get("ENABLED", True)]
    rows["metadata"] = ", ".join(active) if _get(config, "DATA.META.ACTIVE") and active else "none"
    m = _get(config, "MODEL") or {}
    pretrained = m.get("PRETRAINED") or m.get("PRETRAINED_ROPEVIT") or m.get("PRETRAINED_CONVNEXT")
    rows["model"] = f"{m.get('TYPE', '-')} ({m.get('NAME', '-')}), {m.get('IMG_SIZE', '-')} px" + (
        f", from {pretrained}" if pretrained else ", random start"
    )
    steps = _get(config, "TRAIN.MAX_STEPS")
    length = f"{steps} steps" if steps else f"{_get(config, 'TRAIN.EPOCHS')} epochs"
    rows["training"] = (
        f"{length}, batch {_get(config, 'DATA.BATCH_SIZE')} per process, {_get(config, 'LR_SCHEDULER.NAME')} LR "
        f"from {_get(config, 'LR_SCHEDULER.BASE_LR')}, seed {_get(config, 'MISC.SEED')}"
    )
    rows["config"] = str(Path(run) / "config.yaml")
    return rows


# What each plot shows and what to read from it, under the plot in report.html.
PLOT_CAPTIONS = {
    "loss": "Training loss, total and per rank. It should fall and flatten; a rank whose loss stays flat is not being "
    "learned (check its labels and class counts), a sudden jump is instability (lower the LR).",
    "lr": "The learning rate per step: warmup, then the schedule's decay. Use it to line up changes in the other plots "
    "with the schedule.",
    "val_top1": "Validation top-1 per rank. Coarse ranks should sit above fine ones; a curve that falls while training "
    "loss still falls is overfitting.",
    "chain_accuracy": "Share of validation images with every rank right, with and without metadata. The gap between the "
    "two lines is what metadata (place, date) adds.",
    "metadata_gap": "Accuracy with metadata minus accuracy with it masked, per step. Positive: the model uses "
    "metadata; near zero: it ignores it.",
    "images_per_sec": "Training throughput. Dips are validation, checkpoints or a slow disk; a low plateau points at the "
    "input pipeline (`linnaeus bench`).",
}


def _fmt(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if finite(v) else "-"


def _duration(seconds: Any) -> str:
    if not finite(seconds):
        return "-"
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def summary_text(report: Mapping[str, Any]) -> str:
    """The console summary: a few lines a person reads at the end of a run."""
    r = report["ranking"]
    lines = [f"run at step {report['last_step']}: {report['run']}"]
    if r["best"] is not None:
        lines.append(f"  best {r['metric']} = {_fmt(r['best'], 4)} at step {r['best_step']} ({r['mode']})")
    else:
        lines.append(f"  best {r['metric']}: no validation recorded")
    if report["ranks"]:
        label = {**{k: k for k in report["ranks"]}, **report.get("rank_labels", {})}
        width = max(len(label[k]) for k in report["ranks"])
        lines.append(f"  {'rank':<{width}}  top1 final/best   top5 final/best")
        for key, e in report["ranks"].items():
            lines.append(
                f"  {label[key]:<{width}}  {_fmt(e['final_top1'])} / {_fmt(e['best_top1'])}    "
                f"{_fmt(e['final_top5'])} / {_fmt(e['best_top5'])}"
            )
    c = report["chain_accuracy"]
    if c["final"] is not None:
        lines.append(f"  chain accuracy final {_fmt(c['final'])}, best {_fmt(c['best'])} at step {c['best_step']}")
    gap = report["metadata_masked_gap"]
    if "chain_accuracy" in gap:
        lines.append(
            f"  metadata-masked gap (chain accuracy with - without metadata) at step {gap['step']}: "
            f"{gap['chain_accuracy']:+.3f}"
        )
    t = report["timings"]
    parts = []
    if finite(t.get("total_seconds")):
        parts.append(f"total {_duration(t['total_seconds'])}")
    if t.get("phase_seconds"):
        parts.append(", ".join(f"{k} {_duration(v)}" for k, v in t["phase_seconds"].items()))
    if finite(t.get("mean_images_per_sec")):
        parts.append(f"{t['mean_images_per_sec']:.1f} img/s")
    if finite(t.get("data_wait_share")):
        parts.append(f"data wait {100 * t['data_wait_share']:.0f}%")
    if parts:
        lines.append("  time: " + "; ".join(parts))
    for name, path in report["weights"].items():
        lines.append(f"  {name} weights: {path}")
    lines.append(f"  bundle for inference: {report['export_command']}")
    lines.append(f"  report: {Path(report['run']) / 'report.html'}")
    return "\n".join(lines)


def _html(report: Mapping[str, Any], pngs: list[Path]) -> str:
    esc = html.escape
    label = report.get("rank_labels", {})
    rows = "".join(
        f"<tr><td>{esc(label.get(k, k))}</td><td>{_fmt(e['final_top1'])}</td><td>{_fmt(e['best_top1'])}</td>"
        f"<td>{_fmt(e['final_top5'])}</td><td>{_fmt(e['best_top5'])}</td></tr>"
        for k, e in report["ranks"].items()
    )
    setup = "".join(
        f"<tr><th>{esc(k)}</th><td class='l'>{esc(v)}</td></tr>" for k, v in report.get("setup", {}).items()
    )
    images = "".join(
        f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{esc(PLOT_CAPTIONS.get(p.stem, p.stem))}</figcaption></figure>"
        for p in pngs
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Linnaeus run report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}figure{display:inline-block;margin:8px}"
        "img{width:480px}pre{background:#f6f6f6;padding:1em}figcaption{width:480px;font-size:small}"
        "td.l{text-align:left}</style></head><body>"
        f"<h1>Run report</h1><h2>What was trained</h2><table>{setup}</table>"
        f"<h2>Summary</h2><pre>{esc(summary_text(report))}</pre>"
        "<h2>Validation per rank</h2><table><tr><th>rank</th><th>top1 final</th><th>top1 best</th>"
        f"<th>top5 final</th><th>top5 best</th></tr>{rows}</table>"
        f"<h2>Plots</h2>{images or '<p>no plots</p>'}"
        f"<h2>report.json</h2><pre>{esc(json.dumps(report, indent=2))}</pre></body></html>\n"
    )


def write_report(run: Path, timings: Timings | None = None, plots: bool = True) -> str:
    """Write ``report.json`` and ``report.html`` (and ``plots/*.png``) into ``run``; return the console summary.

    Call on the main process only, after the final checkpoint and export."""
    run = Path(run)
    report = build_report(run, timings)
    pngs: list[Path] = []
    if plots:
        from linnaeus.engine.plots import draw_plots

        pngs = draw_plots(run)
        report["plots"] = [str(p) for p in pngs]
    atomic_write_json(run / "report.json", report)
    atomic_write_text(run / "report.html", _html(report, pngs))
    return summary_text(report)


def summary_values(run: Path) -> dict[str, Any]:
    """The written report's headline numbers, flat, for a tracker's run summary (e.g. W&B)."""
    report = json.loads((Path(run) / "report.json").read_text())
    r, t = report["ranking"], report["timings"]
    return {
        f"best/{r['metric']}": r["best"],
        "best/step": r["best_step"],
        "time/total_seconds": t.get("total_seconds"),
        "time/mean_images_per_sec": t.get("mean_images_per_sec"),
        "time/data_wait_share": t.get("data_wait_share"),
    }


# ------------------------------------------------------------------------------------------------ validation table
def format_table_with_history(
    phase: str,
    step: int,
    metrics: Mapping[str, float],
    task_keys: list[str],
    previous: Mapping[str, float] | None = None,
    best: Mapping[str, float] | None = None,
) -> str:
    """The validation table with best-so-far and change since the last evaluation of the same phase.

    ``previous`` is the last evaluation's metrics (None at the first); ``best`` the best value so far per key
    (higher is better for top1/top5/chain accuracy, lower for loss), *before* this evaluation. Use
    ``update_bests`` to keep it."""
    previous = previous or {}
    best = best or {}

    def delta(key: str) -> str:
        return f"{metrics[key] - previous[key]:+.3f}" if key in previous else "-"

    def best_col(key: str) -> str:
        merged = update_bests(best, {key: metrics[key]})
        return f"{merged[key]:.3f}"

    lines = [
        f"{phase} @ step {step}: {int(metrics.get('samples', 0))} samples",
        f"{'rank':<12}{'top1':>8}{'change':>8}{'best':>8}{'top5':>8}{'change':>8}{'best':>8}{'loss':>9}"
        f"{'coverage':>10}",
    ]
    for key in task_keys:
        t1, t5 = f"{key}/top1", f"{key}/top5"
        lines.append(
            f"{key:<12}{metrics[t1]:>8.3f}{delta(t1):>8}{best_col(t1):>8}"
            f"{metrics[t5]:>8.3f}{delta(t5):>8}{best_col(t5):>8}"
            f"{metrics[f'{key}/loss']:>9.3f}{metrics[f'{key}/coverage']:>10.3f}"
        )
    lines.append(
        f"chain accuracy {metrics['chain_accuracy']:.3f} (change {delta('chain_accuracy')}, best "
        f"{best_col('chain_accuracy')})   partial-chain accuracy {metrics['partial_chain_accuracy']:.3f}"
    )
    return "\n".join(lines)


def update_bests(best: Mapping[str, float], metrics: Mapping[str, float]) -> dict[str, float]:
    """Best so far per key after ``metrics``: loss keys go down, the rest go up; non-numbers are ignored."""
    out = dict(best)
    for k, v in metrics.items():
        if not finite(v):
            continue
        lower = k == "loss" or k.endswith("/loss")
        if k not in out or (v < out[k] if lower else v > out[k]):
            out[k] = float(v)
    return out
