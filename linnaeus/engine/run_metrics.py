"""A run's ``metrics.jsonl`` read back: the rows the report, the plots and ``linnaeus plot`` all start from."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
VAL = "val"
VAL_MASKED = "val_mask_meta"


# ------------------------------------------------------------------------------------------------ reading the run
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` in step order. A torn last line (a run still writing, or killed mid-write) is
    skipped; rows repeated after a crash and resume keep the last one written per (phase, step)."""
    if not path.is_file():
        return []
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # only the line being written can be incomplete
        if not isinstance(row, dict) or "phase" not in row or "step" not in row:
            continue
        key = (str(row["phase"]), int(row["step"]))
        latest.pop(key, None)  # re-insert so a resumed run's rows follow its own order
        latest[key] = row
    return sorted(latest.values(), key=lambda r: (int(r["step"]), str(r["phase"])))


def rows_of(rows: Iterable[Mapping[str, Any]], phase: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("phase") == phase]


def task_keys_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Ranks in the order they first appear (the config order: the trainer writes them that way)."""
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k.endswith("/top1") and k[: -len("/top1")] not in keys:
                keys.append(k[: -len("/top1")])
    return keys


def rank_labels(run: Path, keys: Iterable[str]) -> dict[str, str]:
    """Task key -> "species (taxa_L10)", with the rank names the run's taxonomy gave (class_maps.json); the bare key
    where the run folder has no class maps (yet)."""
    names: dict[str, str] = {}
    path = Path(run) / "class_maps.json"
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
            names = {k: str(v["rank"]) for k, v in doc.items() if isinstance(v, dict) and v.get("rank")}
        except (OSError, ValueError):
            names = {}  # a torn file while the run writes it: plain keys this time
    return {k: f"{names[k]} ({k})" if k in names and names[k] != k else k for k in keys}


def finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def metadata_gaps(
    val: Iterable[Mapping[str, Any]], masked: Iterable[Mapping[str, Any]], keys: Iterable[str]
) -> tuple[list[int], dict[str, list[float]]]:
    """The steps where validation ran both with metadata and with it masked, and per metric (chain accuracy, then
    each rank's top-1) with minus without metadata at each of them (NaN where either value is missing)."""
    masked_by_step = {int(r["step"]): r for r in masked}
    pairs = [(r, masked_by_step[int(r["step"])]) for r in val if int(r["step"]) in masked_by_step]
    gaps = {
        k: [float(a[k]) - float(b[k]) if finite(a.get(k)) and finite(b.get(k)) else math.nan for a, b in pairs]
        for k in ["chain_accuracy", *(f"{t}/top1" for t in keys)]
    }
    return [int(a["step"]) for a, _ in pairs], gaps
