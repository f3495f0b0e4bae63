"""End to end: how much of a training step is spent waiting for data, loader and model together.

Two variants of the same training step (normalise on the "device", forward, cross-entropy over the ranks, backward,
AdamW) on the demo model, alternating in windows of ``steps`` steps:

- ``fed``: batches come from our loader (``FileDataset`` + ``build_loader``, fresh workers each window) reading
  JPEGs from disk; the time blocked in ``next()`` is data wait;
- ``preloaded``: the same step on batches already in memory (the model-only ceiling).

``fed_compute`` is the compute part of the fed steps alone: when it is slower than ``preloaded`` the workers are
taking CPU time from the training process, a cost that shows up as slower steps rather than as waiting.

Reported: both step-time medians, their ratio, and the data-wait share Σ wait / Σ (wait + compute) of the fed
windows (the first steps of each window, which include worker start-up, are left out). As in ``linnaeus bench``,
a share near 0 means the loader keeps up; on a 2-core CPU the workers and the model compete for the same cores.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import SIZE_1MP, SIZE_500PX, BenchDataset, Comparison, set_threads, speedup, write_bench_dataset
from benchmarks.trainer_overhead import MinimalLoop

SKIP = 2  # steps at the start of each fed window: worker start-up and the first prefetch


def _build(ds: BenchDataset, img_size: int, batch: int, workers: int):
    from linnaeus.config.resolve_data import data_spec
    from linnaeus.config.resolve_model import model_spec
    from linnaeus.data.loader import build_loader
    from linnaeus.data.prepare import prepare_data
    from linnaeus.models import build_model

    cfg = ds.config(DATA__IMG_SIZE=img_size, MODEL__IMG_SIZE=img_size, DATA__BATCH_SIZE=batch)
    data = prepare_data(data_spec(cfg))
    train = data.dataset("train", train=True)
    loader, sampler = build_loader(train, batch_size=batch, num_workers=workers, shuffle=True, seed=0, drop_last=True)
    hierarchy = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in data.hierarchy_matrices().items()}
    torch.manual_seed(0)
    model = build_model(model_spec(cfg), data.task_keys, data.num_classes, data.meta_dims, hierarchy).train()
    return cfg, data, loader, sampler, model


def fed_window(
    loader, sampler, epoch: int, step: Callable[[dict[str, Any]], Any], steps: int
) -> tuple[list[float], list[float]]:
    """(wait, compute) seconds per step for ``steps`` loader-fed steps (the first SKIP dropped)."""
    sampler.set_epoch(epoch)
    it = iter(loader)
    waits, computes = [], []
    for i in range(steps + SKIP):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        step(batch)
        t2 = time.perf_counter()
        if i >= SKIP:
            waits.append(t1 - t0)
            computes.append(t2 - t1)
    del it  # shut the workers down before the preloaded window, which should have the cores to itself
    return waits, computes


def measure(ds: BenchDataset, *, label: str, img_size: int, batch: int, workers: int, steps: int, windows: int):
    cfg, data, loader, sampler, model = _build(ds, img_size, batch, workers)
    # The same minimal loop the trainer-overhead benchmark compares against: plain CE, AdamW, no extras.
    step = MinimalLoop(model, list(data.task_keys), 1e-4, cfg.AUG.MEAN, cfg.AUG.STD).step
    sampler.set_epoch(0)
    preloaded = list(itertools.islice(iter(loader), steps))
    for b in preloaded[:2]:  # warm-up: allocator, lazy init
        step(b)
    fed, fed_compute, pre, shares = [], [], [], []
    for w in range(windows):
        waits, computes = fed_window(loader, sampler, w + 1, step, steps)
        fed += [a + b for a, b in zip(waits, computes, strict=True)]
        fed_compute += computes
        shares.append(sum(waits) / max(sum(waits) + sum(computes), 1e-9))
        for b in preloaded:
            t0 = time.perf_counter()
            step(b)
            pre.append(time.perf_counter() - t0)
    share = sorted(shares)[len(shares) // 2]
    return Comparison(
        name=f"end to end, {label} JPEGs, loader + {cfg.MODEL.NAME} step ({img_size}px, batch {batch})",
        unit="s/step",
        samples={"fed": fed, "fed_compute": fed_compute, "preloaded": pre},
        ratios={
            "fed/preloaded (img/s)": speedup(fed, pre),
            "data-wait share (median window)": share,
            # < 1 when the workers take CPU time from the training process (same cores), not data wait.
            "fed compute speed / preloaded speed": speedup(fed_compute, pre),
        },
        facts={"workers": workers, "windows": windows, "steps_per_window": steps, "images": len(loader.dataset)},
        items_per_unit=batch,
    )


def run(quick: bool) -> list[Comparison]:
    set_threads(1)
    workers = 1  # with 2 cores: one worker and the training process
    steps, windows = (4, 2) if quick else (8, 3)
    batch = 16 if quick else 32
    comps = []
    with tempfile.TemporaryDirectory(prefix="linnaeus-bench-e2e-") as tmp:
        sets = (("1MP", SIZE_1MP),) if quick else (("1MP", SIZE_1MP), ("500px", SIZE_500PX))
        for label, size in sets:
            # Enough rows that the 85 % training split holds a full window of batches.
            ds = write_bench_dataset(Path(tmp) / label, int((steps + SKIP + 1) * batch / 0.85) + 12, size)
            comps.append(
                measure(ds, label=label, img_size=64, batch=batch, workers=workers, steps=steps, windows=windows)
            )
    return comps


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import run_cli

    return run_cli(run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
