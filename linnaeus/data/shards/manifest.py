"""``manifest.json`` of a shard folder: what was written, from which labels and split, and how to verify it.

The manifest is the reader's only index: shard names, per-shard sample counts and sha256 checksums come from
here, never from globbing the folder, so a stray or stale ``.tar`` cannot leak into training. It also pins the
labels.h5 file(s) (sha256 fingerprint) and the split (seed, ratio and a digest of the row lists) the shards were
cut from; a reader whose ``prepare_data`` result differs refuses to start and says how to reshard.

While ``linnaeus shard`` runs, finished shards are appended to ``.progress.jsonl`` (one JSON record per line)
so an interrupted run can keep them; ``manifest.json`` is written (temp + rename) only when every shard is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from linnaeus.errors import DataError
from linnaeus.utils.io import atomic_write_json

if TYPE_CHECKING:
    from linnaeus.data.prepare import PreparedData

MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = ".progress.jsonl"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(row: int) -> str:
    """Member key of a labels.h5 row: zero-padded, no dots (WebDataset splits the extension at the first dot)."""
    return f"{int(row):010d}"


def rows_digest(rows: np.ndarray) -> str:
    """sha256 of a split's row list (int64, in order): any change of seed, ratio or filters changes it."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype="<i8").tobytes()).hexdigest()


def file_sha256(path: Path, chunk: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def split_identity(prepared: PreparedData) -> dict[str, Any]:
    """What a shard folder must agree on with the run that reads it: labels files, fingerprints, split rows."""
    split = prepared.split
    out: dict[str, Any] = {
        "fingerprint": prepared.fingerprint,
        "seed": int(split.seed),
        "ratio": float(split.ratio),
        "presplit": bool(split.presplit),
        "labels": {},
        "rows": {},
    }
    for name in SPLITS:
        view = prepared.view(name)
        out["labels"][name] = {"path": str(view.store.path), "fingerprint": view.store.fingerprint}
        out["rows"][name] = {"count": len(view.rows), "sha256": rows_digest(view.rows)}
    return out


def read_manifest(shard_dir: Path, *, cfg_hint: str = "EXP.yaml") -> dict[str, Any]:
    """The parsed manifest of ``shard_dir``; DataError (one line) when it is absent, unreadable or too new."""
    path = Path(shard_dir) / MANIFEST_NAME
    rerun = f"run `linnaeus shard --cfg {cfg_hint} --out {shard_dir}`"
    if not path.is_file():
        raise DataError(f"{path}: not found; expected the manifest written by `linnaeus shard` ({rerun})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot be read ({err}); {rerun} again") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{path}: not a linnaeus shard manifest (no format_version/splits); {rerun}")
    if version > FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {version} is newer than this linnaeus reads ({FORMAT_VERSION}); "
            "upgrade linnaeus or reshard"
        )
    return manifest


def write_manifest(shard_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(shard_dir) / MANIFEST_NAME, manifest)


def identity_problem(manifest: dict[str, Any], prepared: PreparedData, split: str, shard_dir: Path) -> str | None:
    """Why ``split`` shards in ``manifest`` do not belong to ``prepared`` (one line, no hint), or None."""
    found = manifest.get("source", {})
    now = split_identity(prepared)
    old_labels = found.get("labels", {}).get(split, {})
    new_labels = now["labels"][split]
    if old_labels.get("fingerprint") != new_labels["fingerprint"]:
        old_fp = str(old_labels.get("fingerprint") or "none")
        return (
            f"{new_labels['path']} changed since the {split} shards in {shard_dir} were written (labels fingerprint "
            f"{old_fp[:12]}… in {MANIFEST_NAME}, {new_labels['fingerprint'][:12]}… now)"
        )
    old_rows = found.get("rows", {}).get(split, {})
    if old_rows.get("sha256") != now["rows"][split]["sha256"]:
        return (
            f"the {split} split ({now['rows'][split]['count']} rows, seed {now['seed']}, ratio {now['ratio']}) differs "
            f"from the one the shards in {shard_dir} were written for ({old_rows.get('count')} rows, seed "
            f"{found.get('seed')}, ratio {found.get('ratio')}); the split seed/ratio or the row filters changed"
        )
    return None


# --------------------------------------------------------------------------------------------- progress log
def read_progress(shard_dir: Path) -> list[dict[str, Any]]:
    """Records of shards finished by an earlier (possibly interrupted) run; a torn last line is ignored."""
    path = Path(shard_dir) / PROGRESS_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # the line a killed run was writing
        if isinstance(rec, dict) and "name" in rec and "plan" in rec and "sha256" in rec:
            records.append(rec)
    return records


def append_progress(shard_dir: Path, record: dict[str, Any]) -> None:
    # One short write per line + fsync: a kill leaves at most one torn final line, which read_progress skips.
    with open(Path(shard_dir) / PROGRESS_NAME, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def clear_progress(shard_dir: Path) -> None:
    (Path(shard_dir) / PROGRESS_NAME).unlink(missing_ok=True)
