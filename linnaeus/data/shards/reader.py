"""Training from shards: a per-process IterableDataset that yields ready batches in the file loader's format.

Per epoch ``e``, the shard list is permuted with ``(seed, e)`` identically on every process, then split by node
(``rank::world``) and by DataLoader worker, so shard ownership rotates each epoch.
A worker reads its shards in that order through a sample shuffle buffer (raw bytes, ``DATA.SHARDS.SHUFFLE_BUFFER``
per worker) and, when they run out before its quota, keeps drawing shards with replacement (weighted by sample
count) from the whole list: the stream is *resampled*, so every process yields exactly
``batches_per_epoch = floor(train samples / (world * batch))`` batches whatever the shard sizes, and all ranks
step together (no hang at epoch end, even with fewer shards than readers). A few samples repeat or sit out in an
epoch; over epochs the rotation covers the data.

Sample-exact resume: a process's batches are ``W`` interleaved streams (``W`` = DataLoader workers; batch ``g``
of the epoch comes from stream ``g mod W``), each a pure function of (seed, epoch, rank, world size, stream, W).
``set_epoch(e, start_batch=k)`` makes the worker that will produce batch ``k`` play stream ``k mod W`` (and so
on round the workers), and each stream first fast-forwards past the batches it made before ``k`` without reading
their images, so the resumed epoch continues with exactly the samples an uninterrupted one would have used. (A
member whose image fails to decode before ``k`` would shift its stream by one sample; verified shards have none,
the writer rejects undecodable images.)

Verification (``DATA.SHARDS.VERIFY``): ``open`` compares each shard's size with the manifest whenever it is
opened; ``full`` (default) also hashes it (sha256) the first time this process reads it in the run, the verdict
shared by all epochs and workers. A shard that fails is skipped whole and its samples counted as corrupt.

Batches: built inside the worker (one IPC message per batch), with exactly the keys and dtypes of the file
loader (``image`` uint8, ``meta``, ``meta_valid``, ``targets`` int64 with -1 null, ``row``, ``is_pad`` all False,
``image_ok`` all True). Images go through the same ``read_image`` as files, ``train=True`` with a generator from
``(seed, epoch, row)``; with ``decode="device"`` a batch carries JPEG bytes + crop plans (``linnaeus.data.encoded``,
the same keys as a file batch) for the main process to decode, with ``decode="worker"`` the worker decodes that
plan itself once the batch is built (``device_decode.decode_in_worker``), as the file loader does. Labels and
metadata are never read from the shard: the sample's ``row`` is looked up in the ``PreparedData`` arrays in
memory, after the manifest's labels fingerprint and split digest were checked.

Why not ``webdataset.WebDataset(resampled=True)``: its resampling is seeded from pid/time unless replaced, its
default node splitter raises under WORLD_SIZE > 1, and ``with_epoch`` counts per worker; the few lines below give
a deterministic stream with an exact per-process batch count (see docs/design.md). Shards stay plain WebDataset.

Corrupt members (undecodable image, bad json, a row outside the train split, a truncated tar) are skipped and
counted (``skipped_count``), with a rate-limited warning; they never stop training unless nothing readable is left.

This loader is not passed to ``accelerator.prepare`` (which would dispatch through rank 0 or re-shard the stream):
each process builds its own with its rank. Validation keeps using the file loader, so metrics stay exact.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from linnaeus.data.batch_stream import BatchStream
from linnaeus.data.dataset import sample_rng
from linnaeus.data.device_decode import decode_in_worker
from linnaeus.data.encoded import EncodedImage, check_decode, image_fields, read_image
from linnaeus.data.images import ImageDecodeError
from linnaeus.data.loader import worker_context, worker_init
from linnaeus.data.samples import SampleTable
from linnaeus.data.shards import manifest as mf
from linnaeus.data.shards.tario import TarFormatError, iter_tar_members
from linnaeus.data.worker_share import ArraysToWorkers
from linnaeus.errors import ConfigError, DataError

if TYPE_CHECKING:
    from linnaeus.data.prepare import PreparedData
    from linnaeus.specs.data import DataSpec, ShardSpec

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_WARN_FIRST = 5  # warn on each of the first few skips per process, then every _WARN_EVERY-th
_WARN_EVERY = 1000
_EPOCH_SALT = 0x5EED5  # keeps the shard permutation stream apart from other (seed, epoch) generators
VERIFY_MODES = ("none", "open", "full")


def open_shard(path: str) -> IO[bytes]:
    """Open one shard for sequential reading (module level so benchmarks can wrap it to add latency)."""
    return open(path, "rb", buffering=1 << 20)


def iter_shard(path: str, on_error: Callable[[str], None]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per sample, grouping consecutive members as WebDataset does.

    A structural problem (truncated or garbled tar, unreadable file) is reported through ``on_error`` and ends
    this shard; the sample being assembled at that point is dropped.
    """
    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with open_shard(path) as fh:
            for name, data in iter_tar_members(fh):
                k, dot, ext = os.path.basename(name).partition(".")  # first dot: key | extension (WebDataset)
                if not dot:
                    continue
                if k != key:
                    if key is not None:
                        yield key, parts
                    key, parts = k, {}
                parts[ext] = data
    except (TarFormatError, OSError) as err:
        on_error(f"shard {path}: {err}")
        return
    if key is not None:
        yield key, parts


class ShardTrainDataset(ArraysToWorkers, IterableDataset):
    """Yields this process's training batches for the current epoch; see the module docstring."""

    def __init__(
        self,
        shards: list[str],
        shard_samples: list[int],
        table: SampleTable,
        *,
        batch_size: int,
        batches_per_epoch: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        img_size: int = 384,
        rrc_scale: tuple[float, float] = (0.35, 1.0),
        rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        where: str = "",
        verify: str = "none",
        shard_bytes: list[int] | None = None,
        shard_sha256: list[str] | None = None,
        decode: str = "cpu",
        allow_missing: bool = False,
    ) -> None:
        if not shards:
            raise DataError(f"{where or 'shards'}: no training shard holds any sample; rerun `linnaeus shard`")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardTrainDataset: rank {rank} is not in [0, {world_size})")
        table = table.sorted_by_row()  # searchsorted lookup by row
        self.rows = table.rows
        self.targets = table.targets
        self.meta = table.meta
        self.meta_valid = table.meta_valid
        self.shards = list(shards)
        if verify not in VERIFY_MODES:
            raise ValueError(f"ShardTrainDataset: verify must be one of {VERIFY_MODES}, got {verify!r}")
        if verify != "none" and (shard_bytes is None or (verify == "full" and shard_sha256 is None)):
            raise ValueError(f"ShardTrainDataset: verify {verify!r} needs shard_bytes (and shard_sha256 for full)")
        self.verify = verify
        self.shard_bytes = list(shard_bytes or [])
        self.shard_sha256 = list(shard_sha256 or [])
        self.shard_samples = [int(c) for c in shard_samples]
        counts = np.asarray(shard_samples, dtype=np.float64)
        self.shard_weights = counts / counts.sum()
        self.total_samples = int(counts.sum())
        self.batch_size = int(batch_size)
        self.batches_per_epoch = int(batches_per_epoch)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.img_size = int(img_size)
        self.rrc_scale = (float(rrc_scale[0]), float(rrc_scale[1]))
        self.rrc_ratio = (float(rrc_ratio[0]), float(rrc_ratio[1]))
        self.where = where
        self.decode = check_decode(decode, "ShardTrainDataset")
        self.allow_missing = bool(allow_missing)  # for an image the decoder rejects after its header read fine
        self.epoch = 0
        self.start_batch = 0
        # Workers are separate processes: a shared counter lets the trainer report skips from all of them. A
        # spawn-context lock is inherited by forked workers and may also be sent to spawn/forkserver ones (a
        # fork-context lock may not).
        ctx = multiprocessing.get_context("spawn")
        self._skipped = ctx.Value("q", 0)
        # Per shard: 0 not hashed yet, 1 sha256 matches, -1 it does not (VERIFY full hashes each shard once).
        self._hashed = ctx.Array("b", len(self.shards))
        self._local_skips = 0

    # ----------------------------------------------------------------------------------------------- epoch
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; a resume at batch ``start_batch`` yields exactly the batches ``start_batch ...`` of
        the uninterrupted epoch (see the module docstring)."""
        if not 0 <= int(start_batch) <= self.batches_per_epoch:
            raise ValueError(f"ShardTrainDataset: start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    @property
    def skipped_count(self) -> int:
        """Corrupt samples skipped so far by this process and its workers (all epochs)."""
        return int(self._skipped.value)

    def worker_shards(self, stream: int, num_streams: int) -> np.ndarray:
        """Stream ``stream``'s shard indices for the current epoch on this rank, in reading order."""
        perm = np.random.default_rng((self.seed % 2**63, self.epoch, _EPOCH_SALT)).permutation(len(self.shards))
        return perm[self.rank :: self.world_size][stream::num_streams]

    # ---------------------------------------------------------------------------------------------- stream
    def _skip(self, what: str, reason: str, count: int = 1) -> None:
        with self._skipped.get_lock():
            self._skipped.value += count
            total = self._skipped.value
        self._local_skips += 1
        if self._local_skips <= _WARN_FIRST or self._local_skips % _WARN_EVERY == 0:
            log.warning("skipping %s: %s (%d corrupt samples skipped so far)", what, reason, total)

    def _shard_stream(self, worker: int, num_workers: int, rng: np.random.Generator) -> Iterator[int]:
        yield from (int(i) for i in self.worker_shards(worker, num_workers))
        while True:  # resampled: with replacement, weighted by samples, until the quota is met
            yield int(rng.choice(len(self.shards), p=self.shard_weights))

    def _raw_samples(self, worker: int, num_workers: int, rng: np.random.Generator) -> Iterator[tuple[str, str, dict]]:
        barren = 0  # consecutive shards without a single sample
        for sid in self._shard_stream(worker, num_workers, rng):
            path = self.shards[sid]
            got = False
            problem = self._shard_problem(sid)
            if problem:
                self._skip(f"all {self.shard_samples[sid]} samples of shard {path}", problem, self.shard_samples[sid])
            for key, parts in () if problem else iter_shard(path, lambda r: self._skip("the rest of a shard", r)):
                got = True
                yield path, key, parts
            barren = 0 if got else barren + 1
            if barren > 2 * len(self.shards) + 8:
                raise DataError(
                    f"{self.where or 'shards'}: {barren} shards in a row held no readable sample; "
                    "the shards look corrupt, rerun `linnaeus shard`"
                )

    def _shard_problem(self, sid: int) -> str | None:
        """Why shard ``sid`` must not be read under ``self.verify`` (one line), or None."""
        if self.verify == "none":
            return None
        path = self.shards[sid]
        try:
            size = os.path.getsize(path)
        except OSError as err:
            return f"cannot be opened ({err.strerror or err})"
        if size != self.shard_bytes[sid]:
            return f"{size} bytes, {mf.MANIFEST_NAME} says {self.shard_bytes[sid]}; rerun `linnaeus shard`"
        if self.verify == "full":
            if self._hashed[sid] == 0:
                self._hashed[sid] = 1 if mf.file_sha256(Path(path)) == self.shard_sha256[sid] else -1
            if self._hashed[sid] < 0:
                return f"sha256 differs from {mf.MANIFEST_NAME} (corrupt); rerun `linnaeus shard`"
        return None

    def _shuffled(self, items: Iterator[Any], rng: np.random.Generator) -> Iterator[Any]:
        if self.shuffle_buffer <= 1:
            yield from items
            return
        buf: list[Any] = []
        for item in items:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            yield buf[j]
            buf[j] = item
        rng.shuffle(buf)  # only reached if the stream ends (it is infinite in training)
        yield from buf

    def _locate(self, parts: dict[str, bytes]) -> tuple[int, str]:
        """(position in the train table, image extension) or raise ValueError with the reason; no image decode."""
        info = json.loads(parts["json"]) if "json" in parts else None
        if not isinstance(info, dict) or not isinstance(info.get("row"), int):
            raise ValueError("no json member with an integer 'row'")
        row = info["row"]
        pos = int(np.searchsorted(self.rows, row))
        if pos >= len(self.rows) or self.rows[pos] != row:
            raise ValueError(f"labels.h5 row {row} is not in this run's training split")
        ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if ext is None:
            raise ValueError(f"no image member (expected one of .{', .'.join(IMAGE_EXTS)})")
        return pos, ext

    def _read_image(self, pos: int, data: bytes) -> np.ndarray | EncodedImage:
        return read_image(
            data,
            decode=self.decode,
            img_size=self.img_size,
            train=True,
            rng=sample_rng(self.seed, self.epoch, int(self.rows[pos])),
            rrc_scale=self.rrc_scale,
            rrc_ratio=self.rrc_ratio,
        )

    def _batch(self, positions: list[int], images: list[np.ndarray | EncodedImage]) -> dict[str, Any]:
        pos = np.asarray(positions, dtype=np.int64)
        n = len(pos)
        batch = {
            **image_fields(images),
            "meta": torch.from_numpy(self.meta[pos]),
            "meta_valid": torch.from_numpy(self.meta_valid[pos]),
            "targets": {k: torch.from_numpy(v[pos]) for k, v in self.targets.items()},
            "row": torch.from_numpy(self.rows[pos]),
            "is_pad": torch.zeros(n, dtype=torch.bool),
            "image_ok": torch.ones(n, dtype=torch.bool),
        }
        return decode_in_worker(batch, allow_missing=self.allow_missing) if self.decode == "worker" else batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader takes its j-th batch from worker j % W; after a resume at k that batch is batch k + j of the
        # epoch, which belongs to stream (k + j) % W.
        stream = (worker + self.start_batch) % num_workers
        skip = len(range(stream, self.start_batch, num_workers))
        quota = len(range(stream, self.batches_per_epoch, num_workers)) - skip
        if quota <= 0:
            return
        key = (self.seed % 2**63, self.epoch, self.rank, self.world_size, stream, num_workers)
        rng = np.random.default_rng(key)
        samples = self._shuffled(self._raw_samples(stream, num_workers, rng), rng)
        skip_samples = skip * self.batch_size
        positions: list[int] = []
        images: list[np.ndarray | EncodedImage] = []
        failures = 0
        limit = max(1000, self.total_samples)  # a whole epoch's worth of failures in a row: not bad luck
        for path, key_, parts in samples:
            try:
                pos, ext = self._locate(parts)
                if skip_samples:  # fast-forward: the batch was used before the resume; image bytes unread
                    skip_samples -= 1
                    continue
                image = self._read_image(pos, parts[ext])
            except (ValueError, ImageDecodeError) as err:
                self._skip(f"sample {key_} of {path}", getattr(err, "reason", str(err)))
                failures += 1
                if failures > limit:
                    raise DataError(
                        f"{self.where or 'shards'}: the last {failures} samples read were all unusable; "
                        "the shards do not match this run's data, rerun `linnaeus shard`"
                    ) from None
                continue
            failures = 0
            positions.append(pos)
            images.append(image)
            if len(positions) == self.batch_size:
                yield self._batch(positions, images)
                positions, images = [], []
                quota -= 1
                if quota == 0:
                    return


# ------------------------------------------------------------------------------------------------ building
def shard_dir_of(shards: ShardSpec) -> Path:
    from linnaeus.data.paths import resolve_path

    if not shards.dir:
        raise ConfigError("DATA.SHARDS.DIR: not set; expected the folder written by `linnaeus shard`")
    return resolve_path(shards.dir)


def check_manifest(manifest: dict[str, Any], prepared: PreparedData, split: str, shard_dir: Path) -> dict[str, Any]:
    """The manifest's entry for ``split`` after the labels/split identity and the shard files are checked."""
    rerun = f"rerun `{mf.reshard_command(manifest, shard_dir)}`"
    problems = mf.identity_problems(manifest, mf.split_identity(prepared), [split], shard_dir)
    if problems:
        raise DataError(f"{problems[0]}; {rerun}")
    entry = manifest["splits"].get(split)
    if not entry:
        raise DataError(f"{shard_dir / mf.MANIFEST_NAME}: has no {split} shards; {rerun} --splits {split}")
    missing, damaged = mf.shard_file_problems(shard_dir, entry)
    if missing:
        raise DataError(
            f"shard {shard_dir / missing[0]}: listed in {mf.MANIFEST_NAME} but missing (+{len(missing) - 1} more); "
            f"{rerun}"
        )
    if damaged:
        log.warning(
            "shard %s (+%d more): size differs from %s; its unreadable samples will be skipped (%s)",
            shard_dir / damaged[0],
            len(damaged) - 1,
            mf.MANIFEST_NAME,
            rerun,
        )
    return entry


def build_shard_batches(
    spec: DataSpec,
    prepared: PreparedData,
    *,
    world_size: int,
    rank: int,
    batch_size: int,
    seed: int,
    num_workers: int,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    multiprocessing_context: Any = None,
    decode: str = "cpu",
) -> BatchStream:
    """The training ``BatchStream`` from ``DATA.SHARDS.DIR``; do not pass its loader to ``accelerator.prepare``.
    ``decode``: where images are decoded (``encoded.DECODE_PLACES``)."""
    shard_dir = shard_dir_of(spec.shards)
    manifest = mf.read_manifest(shard_dir)
    entry = check_manifest(manifest, prepared, "train", shard_dir)
    total = int(entry["num_samples"])
    per_step = world_size * batch_size
    batches = total // per_step
    if batches == 0:
        raise ConfigError(
            f"DATA.BATCH_SIZE: {total} training samples in {shard_dir} cannot fill one batch of {batch_size} "
            f"on each of {world_size} processes"
        )
    used = [s for s in entry["shards"] if s["samples"] > 0]
    readers = world_size * max(1, num_workers)
    if len(used) < readers:
        log.warning(
            "%s: %d training shards for %d readers (processes x workers); readers resample shards, so "
            "training runs, but smaller shards (--samples-per-shard) mix better",
            shard_dir,
            len(used),
            readers,
        )
    dataset = ShardTrainDataset(
        [str(shard_dir / s["name"]) for s in used],
        [int(s["samples"]) for s in used],
        prepared.samples("train", with_paths=False),
        batch_size=batch_size,
        batches_per_epoch=batches,
        world_size=world_size,
        rank=rank,
        seed=seed,
        shuffle_buffer=spec.shards.shuffle_buffer,
        img_size=spec.crop.img_size,
        rrc_scale=spec.crop.rrc_scale,
        rrc_ratio=spec.crop.rrc_ratio,
        where=str(shard_dir),
        verify=spec.shards.verify,
        shard_bytes=[int(s["bytes"]) for s in used],
        shard_sha256=[str(s["sha256"]) for s in used],
        decode=decode,
        allow_missing=spec.images.allow_missing,
    )
    workers = int(num_workers)
    loader = DataLoader(
        dataset,
        batch_size=None,  # batches are built in the workers
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        # Fresh workers each epoch copy the dataset after set_epoch, so they see the new epoch and offset.
        persistent_workers=False,
        multiprocessing_context=worker_context(workers, multiprocessing_context),
        worker_init_fn=worker_init(workers),
        generator=torch.Generator().manual_seed(seed % 2**63),
    )
    return BatchStream(loader, dataset, batches)
