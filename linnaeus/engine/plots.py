"""PNG plots of a run, drawn from ``metrics.jsonl`` alone into ``RUN/plots/``.

Works on a run that is still going (a torn last line is skipped). Only the plots the run has data for are drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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

PLOTS_DIR = "plots"


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    tmp.replace(path)  # a reader (report.html, a browser) never sees half a PNG
    return path


def _gap_lines(
    val: list[dict], masked: list[dict], keys: list[str], label: dict[str, str]
) -> list[tuple[str, list[int], list[float]]]:
    """Per step where both ran: validation with metadata minus validation with it masked (chain, then each rank)."""
    steps, gaps = metadata_gaps(val, masked, keys)
    lines = []
    for key, values in gaps.items():
        shown = [(s, v) for s, v in zip(steps, values, strict=True) if finite(v)]
        name = "chain accuracy" if key == "chain_accuracy" else f"{label[key.split('/')[0]]} top-1"
        lines.append((name, [s for s, _ in shown], [v for _, v in shown]))
    return lines


def draw_plots(run: Path) -> list[Path]:
    """Draw every plot the run's metrics support; return the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never a display, never a GUI backend on a cluster node
    import matplotlib.pyplot as plt

    run = Path(run)
    rows = read_metrics(run / METRICS_FILE)
    out_dir = run / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    train = rows_of(rows, "train")
    val = rows_of(rows, VAL)
    masked = rows_of(rows, VAL_MASKED)
    keys = task_keys_of(val) or sorted({k[: -len("/loss")] for r in train for k in r if k.endswith("/loss")}, key=str)
    label = rank_labels(run, keys)  # legends say "species (taxa_L10)" where the taxonomy names the rank
    written: list[Path] = []

    def plot(name: str, title: str, ylabel: str, lines: list[tuple[str, list[int], list[float]]]) -> None:
        lines = [line for line in lines if line[1]]
        if not lines:
            return
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize="small")
        written.append(_save(fig, out_dir / f"{name}.png"))
        plt.close(fig)

    plot(
        "loss",
        "training loss",
        "loss",
        [("total", *_series(train, "loss")), *((label[k], *_series(train, f"{k}/loss")) for k in keys)],
    )
    plot("lr", "learning rate", "lr", [("lr", *_series(train, "lr"))])
    plot("val_top1", "validation top-1 per rank", "top-1", [(label[k], *_series(val, f"{k}/top1")) for k in keys])
    plot(
        "chain_accuracy",
        "validation chain accuracy",
        "accuracy",
        [("with metadata", *_series(val, "chain_accuracy")), ("metadata masked", *_series(masked, "chain_accuracy"))],
    )
    gap_lines = _gap_lines(val, masked, keys, label)
    plot("metadata_gap", "metadata-masked gap (with - without metadata)", "accuracy difference", gap_lines)
    plot("images_per_sec", "training throughput", "images/s", [("images/s", *_series(train, "images_per_sec"))])
    return written
