"""WebDataset shards against one file per image: writing them, and reading them warm and behind per-open latency.

Data: the demo labels.h5 (12 species, 3 ranks, metadata) with its drawings replaced by 500×375 photo-like JPEGs
(iNat/ImageNet size), in a temporary folder. Interleaved repeats (A B A B ...) of:

1. ``write``: ``write_shards`` (1 and 2 processes: read, decode-check, tar, sha256) against copying the same image
   bytes file by file (read + write), seconds per image; and ``parts``: one ``linnaeus shard`` process against two
   ``--part I/2`` processes started together plus ``--merge`` (what ``shard.sh`` does across nodes), with the
   100 M images / 50 nodes estimate derived from the one-process rate.
2. ``read raw``: every training sample's bytes, from shards (``iter_shard``) against opening each file, on a warm
   page cache and with a simulated ``LATENCY_MS`` per file open (as on NFS/Lustre/object stores, where opening a
   file costs a round trip). Shards pay the latency once per shard, files once per image. Target: >= 3x there.
3. ``loader``: one training epoch of batches, ``build_shard_batches`` against the file loader
   (``FileDataset`` + ``build_loader``), 0 workers, same decode code, warm and with the same latency.

Prints per-variant medians and ratios of medians (read the ratios: absolute numbers drift on a shared machine).

    .venv/bin/python -m benchmarks.shards_cpu --quick [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one process = one DataLoader worker

from benchmarks.common import (
    DEMO_CFG,
    SIZE_500PX,
    Comparison,
    Target,
    format_comparison,
    interleave,
    machine_info,
    median,
    set_threads,
    speedup,
    write_bench_dataset,
)

LATENCY_MS = 3.0
BATCH = 32
# The cluster estimate: 100 M images over 50 nodes of CORES_PER_NODE cores, one writer process per core.
EST_IMAGES, EST_NODES, CORES_PER_NODE = 100_000_000, 50, 32


@contextmanager
def open_latency(ms: float) -> Iterator[None]:
    """Add ``ms`` to every image-file open (training decoder) and every shard open (shard reader)."""
    import linnaeus.data.images as images
    import linnaeus.data.shards.reader as reader

    read, open_shard = images._read, reader.open_shard

    def slow_read(source: Any) -> tuple[bytes, str]:
        if not isinstance(source, (bytes, bytearray, memoryview)):
            time.sleep(ms / 1000)
        return read(source)

    def slow_open(path: str) -> Any:
        time.sleep(ms / 1000)
        return open_shard(path)

    images._read, reader.open_shard = slow_read, slow_open
    try:
        yield
    finally:
        images._read, reader.open_shard = read, open_shard


def read_files(paths: list[str], latency_ms: float) -> int:
    total = 0
    for p in paths:
        if latency_ms:
            time.sleep(latency_ms / 1000)
        with open(p, "rb") as fh:
            total += len(fh.read())
    return total


def read_shards(shards: list[str], latency_ms: float) -> int:
    import linnaeus.data.shards.reader as reader

    total = 0
    for s in shards:
        if latency_ms:
            time.sleep(latency_ms / 1000)
        for _, parts in reader.iter_shard(s, lambda reason: None):
            total += sum(len(v) for v in parts.values())
    return total


def per_image(fn: Callable[[], Any], n: int) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) / n

    return run


def bench(quick: bool, workdir: Path) -> list[Comparison]:
    from linnaeus.config.resolve_data import data_spec
    from linnaeus.data.loader import build_loader
    from linnaeus.data.prepare import prepare_data
    from linnaeus.data.shards import ShardOptions, build_shard_batches, write_shards

    set_threads(1)
    n_images, reps, sps = (240, 3, 32) if quick else (960, 5, 64)
    data = write_bench_dataset(workdir / "data", n_images, SIZE_500PX)
    shard_dir = workdir / "shards"
    cfg = data.config(
        DATA__SHARDS__ENABLED=True,
        DATA__SHARDS__DIR=str(shard_dir),
        DATA__SHARDS__SHUFFLE_BUFFER=256,
        DATA__NUM_WORKERS=0,
    )
    prepared = prepare_data(data_spec(cfg))
    paths = prepared.image_paths("train") + prepared.image_paths("val")
    n_all = len(paths)
    size_mb = sum(os.path.getsize(p) for p in paths) / 1e6
    comps = []

    # 1. writing
    copy_dir = workdir / "copy"

    def copy() -> None:
        shutil.rmtree(copy_dir, ignore_errors=True)
        copy_dir.mkdir()
        for p in paths:
            (copy_dir / os.path.basename(p)).write_bytes(Path(p).read_bytes())

    def shard(workers: int) -> Callable[[], None]:
        def run() -> None:
            out = workdir / f"w{workers}"
            shutil.rmtree(out, ignore_errors=True)
            write_shards(data_spec(cfg), out, ShardOptions(samples_per_shard=sps, workers=workers, progress=False))

        return run

    samples = interleave(
        {
            "copy": per_image(copy, n_all),
            "shard_w1": per_image(shard(1), n_all),
            "shard_w2": per_image(shard(2), n_all),
        },
        reps=reps,
    )
    comps.append(
        Comparison(
            "write: shards vs copying the image bytes",
            "s/img",
            samples,
            ratios={
                "shard_w1 time / copy time": speedup(samples["copy"], samples["shard_w1"]),
                "shard_w2 time / copy time": speedup(samples["copy"], samples["shard_w2"]),
            },
            facts={"images": n_all, "MB": round(size_mb, 1), "samples_per_shard": sps, "cores": os.cpu_count()},
            notes=["sharding also decode-checks every image with the training decoder and hashes each shard"],
        )
    )

    comps.append(bench_parts(data, workdir, n_all, sps, reps))

    # 2. raw reads, and 3. loader epochs
    write_shards(data_spec(cfg), shard_dir, ShardOptions(samples_per_shard=sps, workers=1, progress=False))
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    shards = [str(shard_dir / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    train_paths = prepared.image_paths("train")
    n_train = len(train_paths)
    file_loader, sampler = build_loader(
        prepared.dataset("train", train=True), batch_size=BATCH, num_workers=0, shuffle=True, seed=0
    )
    shard_stream = build_shard_batches(
        data_spec(cfg), prepared, world_size=1, rank=0, batch_size=BATCH, seed=0, num_workers=0
    )
    n_batches = shard_stream.batches_per_epoch
    n_loaded = n_batches * BATCH

    def epoch(loader: Any, set_fn: Callable[[int], None]) -> Callable[[], None]:
        state = {"epoch": 0}

        def run() -> None:
            state["epoch"] += 1
            set_fn(state["epoch"])
            for _ in loader:
                pass

        return run

    for latency in (0.0, LATENCY_MS):
        tag = f"{latency:g} ms per open" if latency else "warm cache"
        raw = interleave(
            {
                "files": per_image(lambda lat=latency: read_files(train_paths, lat), n_train),
                "shards": per_image(lambda lat=latency: read_shards(shards, lat), n_train),
            },
            reps=reps,
        )
        ratio = speedup(raw["shards"], raw["files"])
        comps.append(
            Comparison(
                f"read raw ({tag}): shards vs files",
                "s/img",
                raw,
                ratios={f"read raw {tag}: files time / shards time": ratio},
                targets=[Target(f"shards >= 3x files at {latency:g} ms/open", ratio, 3.0)] if latency else [],
                facts={"images": n_train, "shards": len(shards), "latency_ms": latency},
            )
        )
        with open_latency(latency) if latency else _null():
            loads = interleave(
                {
                    "files": per_image(epoch(file_loader, sampler.set_epoch), n_loaded),
                    "shards": per_image(epoch(shard_stream, shard_stream.set_epoch), n_loaded),
                },
                reps=reps,
            )
        comps.append(
            Comparison(
                f"loader epoch ({tag}): shards vs files, decode + crop, 0 workers",
                "s/img",
                loads,
                ratios={f"loader {tag}: files time / shards time": speedup(loads["shards"], loads["files"])},
                facts={"batches": n_batches, "batch": BATCH, "img_size": cfg.DATA.IMG_SIZE, "latency_ms": latency},
                notes=["decode dominates warm; the per-open latency is what shards remove"],
            )
        )
    return comps


def bench_parts(data: Any, workdir: Path, n_all: int, sps: int, reps: int) -> Comparison:
    """One ``linnaeus shard`` process against two ``--part`` processes at once plus ``--merge`` (whole commands,
    start-up included), one writer process each."""
    opts = data.opts()

    def command(out: Path, *extra: str) -> list[str]:
        cmd = [sys.executable, "-m", "linnaeus", "shard", "--cfg", str(DEMO_CFG), "--out", str(out)]
        return [*cmd, "--samples-per-shard", str(sps), "--workers", "1", *extra, "--opts", *opts]

    def run_parts(n: int) -> Callable[[], None]:
        def run() -> None:
            out = workdir / f"parts{n}"
            shutil.rmtree(out, ignore_errors=True)
            extra = [[f"--part={i}/{n}"] for i in range(n)] if n > 1 else [[]]
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
            procs = [subprocess.Popen(command(out, *e), **quiet) for e in extra]
            errors = [p.communicate()[1] for p in procs]
            if n > 1 and all(p.returncode == 0 for p in procs):
                merge = subprocess.run(command(out, "--merge"), **quiet)
                procs, errors = [merge], [merge.stderr]
            if any(p.returncode != 0 for p in procs):
                raise RuntimeError(f"linnaeus shard with {n} parts failed: {errors[-1][-2000:]}")

        return run

    samples = interleave({"parts1": per_image(run_parts(1), n_all), "parts2": per_image(run_parts(2), n_all)}, reps)
    one = median(samples["parts1"])
    hours = EST_IMAGES * one / (EST_NODES * CORES_PER_NODE) / 3600
    return Comparison(
        "parts: one `linnaeus shard` process vs two `--part I/2` processes + `--merge`",
        "s/img",
        samples,
        ratios={"parts: 1 part time / 2 parts time": speedup(samples["parts2"], samples["parts1"])},
        facts={
            "images": n_all,
            "cores": os.cpu_count(),
            f"est_hours_{EST_IMAGES // 10**6}M_images_{EST_NODES}x{CORES_PER_NODE}_cores": round(hours, 2),
        },
        notes=[
            "whole commands, start-up (imports, reading labels.h5) and the merge included",
            "the estimate scales the one-process rate linearly to one writer per core, without storage limits; "
            "images here are ~500 px passed through (no --max-side re-encode)",
        ],
    )


@contextmanager
def _null() -> Iterator[None]:
    yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats (about a minute)")
    parser.add_argument("--json", default=None, help="write the comparisons (raw samples included) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="linnaeus-bench-shards-") as tmp:
        comps = bench(args.quick, Path(tmp))
    for comp in comps:
        print(format_comparison(comp), flush=True)
    if args.json:
        report = {"machine": machine_info(), "comparisons": [c.to_dict() for c in comps]}
        Path(args.json).write_text(json.dumps(report, indent=1))
    missed = [t.label for c in comps for t in c.targets if not t.met]
    if missed:
        print("targets missed: " + "; ".join(missed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
