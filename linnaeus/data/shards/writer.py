"""Write a run's train/val split as WebDataset tar shards (``linnaeus shard``).

Layout: ``DIR/{split}-%06d.tar``; each sample is two consecutive members, ``<key>.<ext>`` (the original image
bytes, or a JPEG re-encoded to ``max_side`` when asked) and ``<key>.json`` = ``{"row", "identifier"}``, where
``key`` is the zero-padded labels.h5 row. Labels and metadata are deliberately *not* stored: the reader joins them
from labels.h5 by row, so relabelling never silently trains on stale labels (the manifest fingerprint catches it).

Determinism: the split's rows are permuted once with the split seed (so a shard mixes classes even when
labels.h5 is sorted by taxon) and cut into consecutive chunks; every tar header field is fixed (mtime 0, uid/gid
0, empty owner names, mode 0444). The same inputs therefore give byte-identical shards, which is what lets a
rerun keep a finished shard after checking its sha256 against the record of the run that wrote it.

Why ``tarfile`` and not ``webdataset.TarWriter``: TarWriter stamps members with ``time.time()`` and a
``bigdata`` owner unless told otherwise, and offers no hook to hash the bytes as they are written; writing the
two members per sample ourselves is a few lines and keeps every header byte under our control. The result is
plain USTAR that ``webdataset.WebDataset`` and ``tar -tf`` read (the tests check both).

Resumption and freshness: shards are written to ``.{name}.{pid}.tmp`` and renamed when complete, and each finished
shard is appended to the progress log. A rerun keeps a shard whose file hashes to the recorded sha256, whose plan
(rows, identifiers, options) is unchanged *and* whose source images still have the recorded size and mtime (a
digest per shard, ``sources``); anything else, including temp files of a killed run, is rewritten, and the run
says how many shards were rewritten because their sources changed. ``stale_shards`` is the same test for
``linnaeus check``.

Parts: ``--part I/N`` writes the plan's shards ``I, I+N, I+2N, ...`` (one list over train then val), each part
into its own progress log, so N processes on any machines write exactly the shards one process would;
``--merge`` checks that every planned shard has a record with the same plan and a file of the recorded size and
writes the manifest. The plan needs no ``stat`` of the images: parts only stat their own shards' sources.

Missing or corrupt images are found with the training decoder (``load_image``): strict by default (DataError
naming the file, row and shard); with ``DATA.HYBRID.ALLOW_MISSING_IMAGES`` they are left out and counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from linnaeus.data.images import ImageDecodeError, load_image, read_image_file
from linnaeus.data.shards import manifest as mf
from linnaeus.data.shards.folder_lock import ShardFolderLock
from linnaeus.errors import ConfigError, DataError

if TYPE_CHECKING:
    from linnaeus.data.prepare import PreparedData
    from linnaeus.specs.data import DataSpec

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE_MB = 256.0
MAX_DEFAULT_WORKERS = 8
REENCODE_QUALITY = 90
TAR_OVERHEAD = 1536  # two 512-byte headers + on average half a block of padding per member, per sample
SIZE_SAMPLE = 256  # files whose sizes estimate the mean image size for --shard-size-mb
SKIPPED_EXAMPLES = 20  # per split in the manifest
# Pillow format -> member extension. Anything else is re-encoded as JPEG so every member is a common format.
EXT_BY_FORMAT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


# ----------------------------------------------------------------------------------------------- planning
@dataclass
class ShardTask:
    """One shard to write (or keep): everything a worker process needs, nothing that cannot be pickled."""

    split: str
    name: str
    out_dir: str
    rows: list[int]
    identifiers: list[str]
    paths: list[str]
    max_side: int | None
    allow_missing: bool
    plan: str  # digest of what this shard must contain; a kept shard needs the same plan
    previous: dict[str, Any] | None = None  # record of an earlier run with this plan, if any


def plan_digest(split: str, name: str, rows: Sequence[int], identifiers: Sequence[str], max_side: int | None) -> str:
    doc = {"v": mf.FORMAT_VERSION, "split": split, "name": name, "max_side": max_side}
    h = hashlib.sha256(json.dumps(doc, sort_keys=True).encode())
    h.update(np.asarray(rows, dtype="<i8").tobytes())
    for ident in identifiers:
        h.update(ident.encode("utf-8") + b"\0")
    return h.hexdigest()


def estimate_samples_per_shard(paths: Sequence[str], shard_size_mb: float, max_side: int | None) -> int:
    """Samples per shard for a target size, from the mean size of a fixed sample of the files.

    Equal sample counts (rather than cutting at exact byte sizes) keep the plan a pure function of the inputs
    without statting every file, and balance shards across readers; sizes end up close to the target on average.
    """
    if not paths:
        return 1
    rng = np.random.default_rng(0)
    pick = rng.choice(len(paths), size=min(SIZE_SAMPLE, len(paths)), replace=False)

    def size(i: int) -> int | None:
        try:
            return os.path.getsize(paths[int(i)])
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:  # stat is latency-bound on network file systems
        sizes = [s for s in pool.map(size, pick) if s is not None]
    mean = float(np.mean(sizes)) if sizes else 100_000.0
    if max_side:
        mean = min(mean, max_side * max_side * 3 / 8)  # rough JPEG q90 size of a re-encoded image (~3 bits/px)
    return max(1, int(shard_size_mb * 1e6 // (mean + TAR_OVERHEAD)))


def plan_split(
    prepared: PreparedData, split: str, out_dir: Path, *, samples_per_shard: int, max_side: int | None
) -> list[ShardTask]:
    view = prepared.view(split)
    rows = np.asarray(view.rows, dtype=np.int64)
    ids = view.store.identifiers[rows]
    paths = prepared.image_paths(split)
    # One fixed permutation (split seed) spreads classes over shards; chunks of it are the shards.
    order = np.random.default_rng(int(prepared.split.seed)).permutation(len(rows))
    tasks = []
    for index, start in enumerate(range(0, len(rows), samples_per_shard)):
        part = order[start : start + samples_per_shard]
        name = mf.shard_name(split, index)
        r = [int(x) for x in rows[part]]
        i = [str(ids[j]) for j in part]
        tasks.append(
            ShardTask(
                split=split,
                name=name,
                out_dir=str(out_dir),
                rows=r,
                identifiers=i,
                paths=[paths[j] for j in part],
                max_side=max_side,
                allow_missing=bool(prepared.spec.images.allow_missing),
                plan=plan_digest(split, name, r, i, max_side),
            )
        )
    return tasks


# ------------------------------------------------------------------------------------------------ encoding
def _read_bytes(path: str) -> bytes:
    return read_image_file(path)


def _reencode(data: bytes, max_side: int | None, path: str) -> bytes:
    """Upright RGB JPEG, longer side scaled down to ``max_side`` (never up)."""
    try:
        im = Image.open(io.BytesIO(data))
        if max_side:
            w, h = im.size
            scale = max_side / max(w, h)
            if scale < 1 and im.format == "JPEG":
                # DCT-domain reduced decode: never smaller than the target, much faster than a full decode.
                im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        im.load()
        im = ImageOps.exif_transpose(im).convert("RGB")
        if max_side and max(im.size) > max_side:
            scale = max_side / max(im.size)
            size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
            im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=REENCODE_QUALITY)
        return buf.getvalue()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(path, f"cannot decode ({err}); expected a readable JPEG/PNG image") from None


def encode_image(path: str, max_side: int | None) -> tuple[bytes, str]:
    """(member bytes, extension) for one image file; raises ImageDecodeError when training could not decode it."""
    data = _read_bytes(path)
    # The training decoder itself is the check (reduced-size decode, so cheap): what passes here trains.
    load_image(data, img_size=32, train=False, rng=None)
    im = Image.open(io.BytesIO(data))  # header only: format and size
    ext = EXT_BY_FORMAT.get(im.format or "")
    if ext is None or (max_side and max(im.size) > max_side):
        return _reencode(data, max_side, path), "jpg"
    return data, ext


# ------------------------------------------------------------------------------------------------- writing
class _HashingWriter:
    """A write-only file wrapper that hashes and counts everything tarfile writes through it."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write (or keep) one shard; return its record for the progress log and manifest. Runs in a worker."""
    out_dir = Path(task.out_dir)
    final = out_dir / task.name
    prev = task.previous
    # Statted before reading: a source changed while it is being read is seen as changed by the next run.
    sources = mf.sources_digest(mf.source_stats(task.paths))
    stale = prev is not None and prev.get("sources") != sources
    if prev is not None and not stale and final.is_file() and mf.file_sha256(final) == prev["sha256"]:
        return {**prev, "kept": True, "stale": False}
    tmp = out_dir / f".{task.name}.{os.getpid()}.tmp"
    skipped: list[dict[str, Any]] = []
    samples = 0
    try:
        with open(tmp, "wb") as raw:
            hashing = _HashingWriter(raw)
            with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for row, ident, path in zip(task.rows, task.identifiers, task.paths, strict=True):
                    try:
                        data, ext = encode_image(path, task.max_side)
                    except ImageDecodeError as err:
                        if not task.allow_missing:
                            raise DataError(
                                f"image {path} (labels.h5 row {row}, {task.split} shard {task.name}): {err.reason}; "
                                "fix or remove it, or set DATA.HYBRID.ALLOW_MISSING_IMAGES True to skip and count it"
                            ) from None
                        skipped.append({"row": row, "identifier": ident, "path": path, "reason": err.reason})
                        continue
                    key = mf.sample_key(row)
                    meta = json.dumps({"identifier": ident, "row": row}, sort_keys=True).encode("utf-8")
                    # Image first, then json: members of one sample stay consecutive, as WebDataset groups them.
                    tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
                    tar.addfile(_member(f"{key}.json", len(meta)), io.BytesIO(meta))
                    samples += 1
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "split": task.split,
        "name": task.name,
        "plan": task.plan,
        "sha256": hashing.sha.hexdigest(),
        "bytes": hashing.size,
        "samples": samples,
        "skipped": skipped,
        "sources": sources,
        "kept": False,
        "stale": stale,
    }


# -------------------------------------------------------------------------------------------------- driver
@dataclass
class ShardOptions:
    samples_per_shard: int | None = None
    shard_size_mb: float | None = None
    workers: int | None = None
    max_side: int | None = None
    splits: tuple[str, ...] = ("train", "val")
    cfg_path: str | None = None
    command: str | None = None  # the original command, repeated by every "reshard" message
    part: mf.Part | None = None  # write only this part of the plan; no manifest
    progress: bool = True

    def validate(self) -> None:
        bad = [s for s in self.splits if s not in mf.SPLITS]
        if bad or not self.splits:
            raise ConfigError(f"--splits: {','.join(self.splits)!r} is not a comma-separated subset of train,val")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ConfigError(f"--samples-per-shard: must be >= 1, got {self.samples_per_shard}")
        if self.shard_size_mb is not None and self.shard_size_mb <= 0:
            raise ConfigError(f"--shard-size-mb: must be > 0, got {self.shard_size_mb}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers: must be >= 1, got {self.workers}")
        if self.max_side is not None and self.max_side < 8:
            raise ConfigError(f"--max-side: must be >= 8 pixels, got {self.max_side}")


def _old_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        return mf.read_manifest(out_dir)
    except DataError:
        return None  # none yet (first or interrupted run) or unreadable: nothing to keep from it


def _previous_records(old: dict[str, Any] | None, out_dir: Path) -> dict[str, dict[str, Any]]:
    """name -> record of shards an earlier run finished (complete manifest first, then the progress logs)."""
    records: dict[str, dict[str, Any]] = {}
    for split, entry in (old or {}).get("splits", {}).items():
        for rec in entry.get("shards", []):
            if "plan" in rec and "sha256" in rec:
                records[rec["name"]] = {**rec, "split": split}
    for rec in mf.read_progress(out_dir):
        records[rec["name"]] = rec
    return records


def _retire_manifest(out_dir: Path, old: dict[str, Any] | None, tasks: list[ShardTask], part: mf.Part | None) -> None:
    """Remove manifest.json before any shard may change (whether a source changed is only known when a writer
    stats it), so a run killed half-way cannot leave a manifest that describes other files; readers then stop
    with "manifest not found" until the rerun finishes. Its records with an unchanged plan move to the progress
    log, so that rerun (or any part) keeps those shards."""
    if old is None:
        return
    for t in tasks:
        if t.previous is not None:
            mf.append_progress(out_dir, {k: v for k, v in t.previous.items() if k not in ("kept", "stale")}, part)
    (out_dir / mf.MANIFEST_NAME).unlink(missing_ok=True)


def _remove_temp_files(out_dir: Path, names: Iterable[str]) -> None:
    # Only the temp files of our own shards: parallel parts write theirs into the same folder.
    for name in names:
        for tmp in out_dir.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _clean_stale(out_dir: Path, split: str, planned: set[str]) -> None:
    for old in out_dir.glob(f"{split}-*.tar"):
        if old.name not in planned:
            old.unlink(missing_ok=True)  # from a run with another shard size; no manifest would list it


def _run_tasks(tasks: list[ShardTask], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield write_shard(task)
        return
    # spawn: the parent may hold torch/h5py state that is not fork-safe; workers only need PIL and numpy.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes=min(workers, len(tasks))) as pool:
        # An exception (e.g. a strict missing image) propagates here; leaving the block terminates the others.
        yield from pool.imap_unordered(write_shard, tasks, chunksize=1)


def _split_entry(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    recs = sorted(records, key=lambda r: r["name"])
    skipped = [s for r in recs for s in r.get("skipped", [])]
    return {
        "num_samples": sum(r["samples"] for r in recs),
        "num_shards": len(recs),
        "num_skipped": len(skipped),
        "skipped_examples": skipped[:SKIPPED_EXAMPLES],
        "shards": [
            {
                "name": r["name"],
                "samples": r["samples"],
                "bytes": r["bytes"],
                "sha256": r["sha256"],
                "plan": r["plan"],
                "sources": r.get("sources"),
                "skipped": r.get("skipped", []),
            }
            for r in recs
        ],
    }


@dataclass
class ShardPlan:
    """Every shard of the requested splits, in plan order (train then val), with what an earlier run left."""

    prepared: PreparedData
    tasks: list[ShardTask]
    samples_per_shard: dict[str, int]
    old: dict[str, Any] | None


def plan_shards(spec: DataSpec, out: Path, opts: ShardOptions) -> ShardPlan:
    from linnaeus.data.prepare import prepare_data

    prepared = prepare_data(spec, check_images=False)  # the images are checked here, shard by shard
    old = _old_manifest(out)
    previous = _previous_records(old, out)
    tasks: list[ShardTask] = []
    per_split: dict[str, int] = {}
    for split in opts.splits:
        sps = opts.samples_per_shard or estimate_samples_per_shard(
            prepared.image_paths(split), opts.shard_size_mb or DEFAULT_SHARD_SIZE_MB, opts.max_side
        )
        per_split[split] = sps
        for t in plan_split(prepared, split, out, samples_per_shard=sps, max_side=opts.max_side):
            rec = previous.get(t.name)
            t.previous = rec if rec is not None and rec.get("plan") == t.plan else None
            tasks.append(t)
    return ShardPlan(prepared, tasks, per_split, old)


def write_shards(spec: DataSpec, out_dir: str | os.PathLike, options: ShardOptions | None = None) -> dict[str, Any]:
    """Shard the run's split of ``spec`` into ``out_dir``; return the manifest (also written as manifest.json).

    With ``options.part``, write only that part's shards and return a summary instead (no manifest). One run per
    folder (``folder_lock``): parts of one plan side by side, a full run or merge alone."""
    opts = options or ShardOptions()
    opts.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ShardFolderLock(out, opts.part):
        return _write_shards(spec, out, opts)


def _write_shards(spec: DataSpec, out: Path, opts: ShardOptions) -> dict[str, Any]:
    from tqdm.auto import tqdm

    plan = plan_shards(spec, out, opts)
    part = opts.part
    mine = plan.tasks if part is None else plan.tasks[part.index :: part.count]
    _retire_manifest(out, plan.old, plan.tasks, part)
    for split in opts.splits:
        _clean_stale(out, split, {t.name for t in plan.tasks if t.split == split})
    _remove_temp_files(out, [t.name for t in mine])

    workers = opts.workers or min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS)
    done: list[dict[str, Any]] = []
    try:
        desc = "shard" if part is None else f"shard part {part}"
        with tqdm(
            total=sum(len(t.rows) for t in mine), desc=desc, unit="img", file=sys.stderr, disable=not opts.progress
        ) as bar:
            for rec in _run_tasks(mine, workers):
                # A part logs kept shards too: --merge needs a record of every shard, and the manifest that
                # held the old record may be retired by another part meanwhile.
                if not rec["kept"] or part is not None:
                    mf.append_progress(out, {k: v for k, v in rec.items() if k not in ("kept", "stale")}, part)
                done.append(rec)
                bar.update(rec["samples"] + len(rec.get("skipped", [])))
    except BaseException:
        _remove_temp_files(out, [t.name for t in mine])  # workers terminated mid-shard cannot remove theirs
        raise
    counts = {
        "written": sum(not r["kept"] for r in done),
        "kept": sum(bool(r["kept"]) for r in done),
        "stale": sum(bool(r.get("stale")) for r in done),
    }
    log.info("wrote %d shards (%d kept, %d rewritten for changed sources) to %s", *counts.values(), out)
    if part is not None:
        return {"part": str(part), "shards": len(mine), "planned": len(plan.tasks), **counts}
    manifest = _finish(out, plan, opts, done)
    manifest["_counts"] = counts  # for the CLI summary only; not part of the file
    return manifest


def merge_parts(spec: DataSpec, out_dir: str | os.PathLike, options: ShardOptions | None = None) -> dict[str, Any]:
    """Check that the parts wrote every planned shard (a record with the same plan and a file of the recorded size)
    and write the manifest; DataError naming the first shard missing and how many."""
    opts = options or ShardOptions()
    opts.validate()
    out = Path(out_dir)
    if not out.is_dir():
        raise DataError(f"--out {out}: no such folder; run the parts first")
    with ShardFolderLock(out, None):
        return _merge_parts(spec, out, opts)


def _merge_parts(spec: DataSpec, out: Path, opts: ShardOptions) -> dict[str, Any]:
    plan = plan_shards(spec, out, opts)
    records, missing = [], []
    for t in plan.tasks:
        rec = t.previous
        path = out / t.name
        if rec is None or not path.is_file() or path.stat().st_size != rec["bytes"]:
            missing.append(t.name)
        else:
            records.append({**rec, "split": t.split})
    if missing:
        raise DataError(
            f"{out / missing[0]}: no finished shard for this plan (+{len(missing) - 1} more of {len(plan.tasks)}); "
            "a part has not finished or was run with other options; rerun the parts with the same command and "
            "options, then --merge"
        )
    manifest = _finish(out, plan, opts, records)
    manifest["_counts"] = {"written": 0, "kept": len(records), "stale": 0}
    return manifest


def _finish(out: Path, plan: ShardPlan, opts: ShardOptions, records: list[dict[str, Any]]) -> dict[str, Any]:
    from linnaeus import __version__

    identity = mf.split_identity(plan.prepared)
    manifest: dict[str, Any] = {
        "format_version": mf.FORMAT_VERSION,
        "tool": {"name": "linnaeus", "version": __version__},
        "config": opts.cfg_path,
        "command": opts.command,
        "source": identity,
        "options": {
            "samples_per_shard": plan.samples_per_shard,
            "shard_size_mb": None if opts.samples_per_shard else (opts.shard_size_mb or DEFAULT_SHARD_SIZE_MB),
            "max_side": opts.max_side,
            "order_seed": int(plan.prepared.split.seed),
        },
        "splits": {s: _split_entry(r for r in records if r["split"] == s) for s in opts.splits},
    }
    _keep_other_splits(out, plan.old, manifest, identity)
    manifest["num_samples"] = sum(e["num_samples"] for e in manifest["splits"].values())
    manifest["num_shards"] = sum(e["num_shards"] for e in manifest["splits"].values())
    mf.write_manifest(out, manifest)
    mf.clear_progress(out)
    return manifest


def stale_shards(prepared: PreparedData, manifest: dict[str, Any], shard_dir: Path) -> dict[str, list[str]]:
    """split -> names of listed shards whose source images changed (size or mtime) since they were written."""
    out: dict[str, list[str]] = {}
    options = manifest.get("options", {})
    for split, entry in manifest["splits"].items():
        sps = options.get("samples_per_shard", {}).get(split)
        if not sps:
            continue
        tasks = {
            t.name: t
            for t in plan_split(
                prepared, split, shard_dir, samples_per_shard=int(sps), max_side=options.get("max_side")
            )
        }
        out[split] = [
            s["name"]
            for s in entry.get("shards", [])
            if s["name"] in tasks and s.get("sources") != mf.sources_digest(mf.source_stats(tasks[s["name"]].paths))
        ]
    return out


def _keep_other_splits(out: Path, old: dict[str, Any] | None, manifest: dict[str, Any], identity: dict) -> None:
    """A run with ``--splits train`` keeps an earlier run's val entry when it was cut from the same data."""
    if old is None or old.get("source", {}).get("fingerprint") != identity["fingerprint"]:
        return
    for split, entry in old["splits"].items():
        rows_now = identity["rows"].get(split, {}).get("sha256")
        if split not in manifest["splits"] and old["source"].get("rows", {}).get(split, {}).get("sha256") == rows_now:
            if all((out / s["name"]).is_file() for s in entry.get("shards", [])):
                manifest["splits"][split] = entry
