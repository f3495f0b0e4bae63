"""``manifest.json`` of a shard folder: what was written, from which labels and split, and how to verify it.

The manifest is the reader's only index: shard names, per-shard sample counts and sha256 checksums come from
here, never from globbing the folder, so a stray or stale ``.tar`` cannot leak into training. It also pins the
labels.h5 file(s) (sha256 fingerprint) and the split (seed, ratio and a digest of the row lists) the shards were
cut from; a reader whose ``prepare_data`` result differs refuses to start and says how to reshard.

While ``linnaeus shard`` runs, finished shards are appended to a progress log (one JSON record per line) so an
interrupted run can keep them: ``.progress.jsonl`` for a whole run, ``.progress.part-I-of-N.jsonl`` for
``--part I/N`` (parallel parts never write the same file). ``manifest.json`` is written (temp + rename) only when
every shard is done, by the whole run or by ``--merge``; it holds no timestamp, so the same inputs give the same
manifest however many parts wrote the shards.

The rules about a shard folder live here once: whether it belongs to the current labels and split
(``identity_problems``), whether its files are present and intact (``shard_file_problems``), and the command that
remakes it (``reshard_command``, the recorded original command with its ``--opts``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from linnaeus.errors import ConfigError, DataError
from linnaeus.utils.io import atomic_write_json

if TYPE_CHECKING:
    from linnaeus.data.prepare import PreparedData
    from linnaeus.specs.data import LabelsSpec

MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = ".progress.jsonl"
PROGRESS_GLOB = ".progress*.jsonl"
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


def reshard_command(manifest: dict[str, Any] | None, shard_dir: Path, cfg_hint: str = "EXP.yaml") -> str:
    """The command that (re)makes ``shard_dir``: the one recorded in its manifest, else a generic one."""
    recorded = (manifest or {}).get("command")
    if isinstance(recorded, str) and recorded:
        return recorded
    cfg = (manifest or {}).get("config") or cfg_hint
    return f"linnaeus shard --cfg {cfg} --out {shard_dir}"


def read_manifest(shard_dir: Path, *, cfg_hint: str = "EXP.yaml") -> dict[str, Any]:
    """The parsed manifest of ``shard_dir``; DataError (one line) when it is absent, unreadable or too new."""
    path = Path(shard_dir) / MANIFEST_NAME
    rerun = f"run `{reshard_command(None, shard_dir, cfg_hint)}`"
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


def labels_identity(labels: LabelsSpec) -> dict[str, Any]:
    """The labels part of ``split_identity`` without reading labels.h5 (fingerprint = sha256 of the file)."""
    from linnaeus.data.labels import file_fingerprint
    from linnaeus.data.paths import label_paths

    train, val = label_paths(labels)
    fp_train = file_fingerprint(train)
    val_path, fp_val = (val, file_fingerprint(val)) if val else (train, fp_train)
    return {
        "labels": {
            "train": {"path": str(train), "fingerprint": fp_train},
            "val": {"path": str(val_path), "fingerprint": fp_val},
        }
    }


def identity_problems(manifest: dict[str, Any], now: dict[str, Any], splits: list[str], shard_dir: Path) -> list[str]:
    """Why the ``splits`` shards in ``manifest`` do not belong to the data described by ``now`` (``split_identity``,
    or ``labels_identity`` when only the labels are known): one line per split, without the reshard hint."""
    found = manifest.get("source", {})
    problems = []
    for split in splits:
        old_labels = found.get("labels", {}).get(split, {})
        new_labels = now["labels"][split]
        if old_labels.get("fingerprint") != new_labels["fingerprint"]:
            old_fp = str(old_labels.get("fingerprint") or "none")
            problems.append(
                f"{new_labels['path']} changed since the {split} shards in {shard_dir} were written (labels "
                f"fingerprint {old_fp[:12]}… in {MANIFEST_NAME}, {new_labels['fingerprint'][:12]}… now)"
            )
            continue
        if "rows" not in now:
            continue
        old_rows, new_rows = found.get("rows", {}).get(split, {}), now["rows"][split]
        if old_rows.get("sha256") != new_rows["sha256"]:
            problems.append(
                f"the {split} split ({new_rows['count']} rows, seed {now['seed']}, ratio {now['ratio']}) differs "
                f"from the one the shards in {shard_dir} were written for ({old_rows.get('count')} rows, seed "
                f"{found.get('seed')}, ratio {found.get('ratio')}); the split seed/ratio or the row filters changed"
            )
    return problems


def shard_file_problems(shard_dir: Path, entry: dict[str, Any], *, checksums: bool = False) -> tuple[list, list]:
    """(missing, damaged) shard names of one split entry: absent files; a size (and with ``checksums`` a sha256)
    other than the manifest's."""
    missing, damaged = [], []
    for shard in entry.get("shards", []):
        path = Path(shard_dir) / shard["name"]
        if not path.is_file():
            missing.append(shard["name"])
        elif path.stat().st_size != shard["bytes"] or (checksums and file_sha256(path) != shard["sha256"]):
            damaged.append(shard["name"])
    return missing, damaged


def source_stats(paths: list[str]) -> list[tuple[int, int]]:
    """(size, mtime in ns) of each source image; (-1, 0) for one that cannot be statted."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((int(st.st_size), int(st.st_mtime_ns)))
        except OSError:
            out.append((-1, 0))
    return out


def sources_digest(stats: list[tuple[int, int]]) -> str:
    """sha256 of a shard's source (size, mtime) list in plan order: it changes when any source file changes."""
    return hashlib.sha256(np.asarray(stats, dtype="<i8").reshape(-1, 2).tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------- progress log
@dataclass(frozen=True)
class Part:
    """``--part I/N``: the shards whose index in the plan is I modulo N (0 <= I < N)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Part:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m or not int(m.group(1)) < int(m.group(2)):
            raise ConfigError(f"--part: expected I/N with 0 <= I < N (e.g. 3/50), got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def progress_path(shard_dir: Path, part: Part | None = None) -> Path:
    name = PROGRESS_NAME if part is None else f".progress.part-{part.index}-of-{part.count}.jsonl"
    return Path(shard_dir) / name


def read_progress(shard_dir: Path) -> list[dict[str, Any]]:
    """Records of shards finished by earlier (possibly interrupted) runs and parts; torn last lines are ignored."""
    records = []
    for path in sorted(Path(shard_dir).glob(PROGRESS_GLOB)):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # the line a killed run was writing
            if isinstance(rec, dict) and "name" in rec and "plan" in rec and "sha256" in rec:
                records.append(rec)
    return records


def append_progress(shard_dir: Path, record: dict[str, Any], part: Part | None = None) -> None:
    # One short write per line + fsync: a kill leaves at most one torn final line, which read_progress skips.
    with open(progress_path(shard_dir, part), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def clear_progress(shard_dir: Path) -> None:
    for path in Path(shard_dir).glob(PROGRESS_GLOB):
        path.unlink(missing_ok=True)
