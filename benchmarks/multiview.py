"""Multi-view training throughput against image training: images per second through the real trainer step.

Two ``Trainer``s are set up in this process from the demo experiment on the same files: ``image`` (one photo per
sample, batch 32) and ``multiview`` (``DATA.OBSERVATIONS`` on: one observation per sample, K = 4 views, batch 8,
``MODEL.VIEW_POOLING mean``), so every step trains the same backbone on the same number of images (32). The
benchmark writes its own ≤ 500 px photo-like JPEGs and gives ``labels.h5`` an ``observation_ids`` dataset in which
every observation has exactly K photos (of one species): no view slot is empty, so every image the backbone sees is
a real photo and images/s means the same on both sides. Both trainers draw the same observation split.

Each side runs what ``Trainer.fit`` runs per step (``train_step`` on the accumulation window, then ``after_step``:
logging, progress, the schedules), fed by its own real training stream (``FileDataset`` rows, or the
``ObservationDataset`` that reads K rows per sample, collated to (B, K, 3, S, S) with a view mask; one worker, as on
2 cores). Comparisons:

- ``loader + step`` (the user-facing number, and the target): windows of steps, A B B A A B ..., each window a
  fresh epoch of the real loader (new workers; the first steps, which include worker start-up, are left out); a
  sample is a window's seconds per image, images counted from the batches themselves (present views:
  ``view_mask.sum()``). The target uses the median of per-pair ratios (two windows back to back share the
  machine's momentary load); the ratio of medians is printed beside it.
- ``step only``: the same trainer steps on batches each loader produced beforehand (in memory), alternating step
  by step; isolates the trainer/model side (augmentation of B·K views, pooling, per-observation loss).
- ``2-4 photos per observation`` (loader + step, reported, no target): observations of 2-4 photos as in the demo
  data, still K = 4. The backbone computes every view slot (static shapes: no device sync, no recompiles), so empty
  slots cost compute but carry no image; images/s counts present views, and the rate per slot is shown beside it.

Target: multi-view images/s >= 0.9x image training's (loader + step, full observations). Images are counted from
the batches here; the trainer's own logged ``images_per_sec`` counts the same (views present).
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    SIZE_500PX,
    BenchDataset,
    Comparison,
    Target,
    median,
    set_threads,
    speedup,
    write_bench_dataset,
)
from benchmarks.trainer_overhead import quiet_trainer

VIEWS = 4
IMAGES_PER_STEP = 32  # image batch 32 vs 8 observations x 4 views
SKIP = 2  # first steps of a loader window: worker start-up and the first prefetch
WARMUP_STEPS = 2  # untimed steps per trainer before anything is measured (allocator growth, lazy init)
TASKS = ("taxa_L10", "taxa_L20", "taxa_L30")


def add_observations(ds: BenchDataset, sizes: tuple[int, int] = (VIEWS, VIEWS), seed: int = 0) -> int:
    """Give ``ds``'s labels.h5 ``observation_ids``: its rows, ordered by species, grouped into observations of
    ``sizes`` (min, max) photos each (drawn per observation), every photo taking its observation's first labels.
    Returns the number of observations. With (K, K), ``ds.num_images`` must be a multiple of K: every observation
    has exactly K photos; otherwise max must be at least 2 min - 1 (so the rows always split into such sizes)."""
    import h5py

    lo, hi = sizes
    if lo == hi and ds.num_images % lo:
        raise ValueError(f"{ds.num_images} rows do not make observations of {lo} views")
    if lo != hi and hi < 2 * lo - 1:
        raise ValueError(f"observations of {lo}-{hi} photos: the rows may not split into such sizes")
    rng = np.random.default_rng(seed)
    group = np.empty(ds.num_images, np.int64)
    start, n = 0, 0
    while start < ds.num_images:
        left = ds.num_images - start
        # the last observations keep at least ``lo`` photos: take all that is left, or leave ``lo`` of it
        size = left if left <= hi else min(int(rng.integers(lo, hi + 1)), left - lo)
        group[start : start + size] = n
        start, n = start + size, n + 1
    with h5py.File(ds.labels, "r+") as f:
        taxa = {k: f[k][()] for k in TASKS}
        order = np.lexsort((np.arange(ds.num_images), taxa["taxa_L10"], taxa["taxa_L20"], taxa["taxa_L30"]))
        ids = np.empty(ds.num_images, np.int64)
        ids[order] = group + 1
        firsts = np.flatnonzero(np.diff(group, prepend=-1))  # each observation's first position in ``order``
        for k, col in taxa.items():
            labels = np.empty_like(col)
            labels[order] = col[order][firsts][group]
            f[k][...] = labels
        f.create_dataset("observation_ids", data=ids)
    return n


def write_dataset(
    root: Path, observations: int, sizes: tuple[int, int] = (VIEWS, VIEWS), photo: tuple[int, int] = SIZE_500PX
) -> BenchDataset:
    """At least ``observations`` observations of ``sizes`` photos each (``photo``-sized JPEGs); with full observations
    the row count is rounded up so every one of the 12 species has whole observations."""
    per_species = -(-observations * sizes[1] // 12)
    per_species += -per_species % sizes[1]
    ds = write_bench_dataset(root, per_species * 12, photo)
    add_observations(ds, sizes)
    return ds


def setup_trainer(ds: BenchDataset, out: Path, name: str, *, multiview: bool, **overrides: Any):
    """A ``Trainer`` set up (data, model, optimizer) and begun (``_begin``: what ``fit`` does before its first
    step), with validation and checkpoints out of reach; ``overrides`` as ``--opts`` keywords."""
    from linnaeus.engine.trainer import Trainer

    opts: dict[str, Any] = {
        "EXPERIMENT__OUTPUT_DIR": str(out),
        "EXPERIMENT__NAME": name,
        "TRAIN__MAX_STEPS": 100_000,
        "SCHEDULE__VALIDATION__INTERVAL": "{STEPS: 1000000}",
        "SCHEDULE__VALIDATION__MASK_META_INTERVAL": "{STEPS: 1000000}",
        "SCHEDULE__CHECKPOINT__INTERVAL": "{STEPS: 1000000}",
    }
    if multiview:
        opts |= {
            "DATA__OBSERVATIONS__ENABLED": True,
            "DATA__OBSERVATIONS__VIEWS": VIEWS,
            "DATA__BATCH_SIZE": IMAGES_PER_STEP // VIEWS,
            "MODEL__VIEW_POOLING": "mean",
        }
    else:
        opts |= {"DATA__BATCH_SIZE": IMAGES_PER_STEP}
    trainer = Trainer(ds.config(**(opts | overrides)))
    trainer.setup()
    if trainer.plan.accumulation != 1 or trainer.plan.world_size != 1:
        raise RuntimeError("the benchmark drives one process without gradient accumulation")
    trainer._begin()
    return trainer


def images_in(batch: dict[str, Any]) -> tuple[int, int]:
    """(images present, image slots the backbone computes) of one training batch."""
    mask = batch.get("view_mask")
    if mask is None:
        n = int(batch["image"].shape[0])
        return n, n
    return int(mask.sum()), int(mask.numel())


def step(trainer, batch: dict[str, Any]) -> None:
    """One optimizer step as ``fit`` runs it (window of one micro-batch, then the after-step actions)."""
    trainer.train_step([batch])
    trainer.after_step()


class Side:
    """One variant: a trainer and its real training stream, epoch by epoch."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.epoch = 0
        self.present = 0  # images present in the timed loader windows
        self.slots = 0  # image slots the backbone computed in them

    def batches(self, n: int) -> list[dict[str, Any]]:
        """``n`` batches of a fresh epoch of the real loader (in memory from then on)."""
        stream = self.trainer.train_batches
        stream.set_epoch(self.epoch)
        self.epoch += 1
        return list(itertools.islice(iter(stream), n))

    def window(self, steps: int) -> tuple[float, int, int]:
        """A fresh epoch of the real loader (new workers), ``SKIP + steps`` steps; (seconds, images present, image
        slots) of the last ``steps`` (loader wait + step)."""
        stream = self.trainer.train_batches
        stream.set_epoch(self.epoch)
        self.epoch += 1
        it = iter(stream)
        seconds, present, slots = 0.0, 0, 0
        for i in range(SKIP + steps):
            t0 = time.perf_counter()
            batch = next(it)
            step(self.trainer, batch)
            if i >= SKIP:
                seconds += time.perf_counter() - t0
                p, s = images_in(batch)
                present, slots = present + p, slots + s
        del it  # shut its worker down before the other side's window
        self.present += present
        self.slots += slots
        return seconds, present, slots


def measure(
    ds: BenchDataset, out: Path, *, label: str, steps: int, windows: int, pairs: int = 0, **overrides: Any
) -> list[Comparison]:
    """Loader + step windows, A B A B (and, with ``pairs``, the step-only comparison first)."""
    with quiet_trainer():
        sides = {
            "image": Side(setup_trainer(ds, out, f"image_{label}", multiview=False, **overrides)),
            "multiview": Side(setup_trainer(ds, out, f"multiview_{label}", multiview=True, **overrides)),
        }
        train_rows = {name: s.trainer.data.view("train").rows for name, s in sides.items()}
        if not np.array_equal(train_rows["image"], train_rows["multiview"]):
            raise RuntimeError("the two trainers drew different training splits")
        cfg = sides["image"].trainer.cfg
        batches = {name: s.batches(pairs + WARMUP_STEPS) for name, s in sides.items()}
        for name, s in sides.items():  # warm-up: allocator growth, lazy initialisation
            for b in batches[name][:WARMUP_STEPS]:
                step(s.trainer, b)
        # Step only: alternate step by step on the batches already in memory.
        per_step: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(WARMUP_STEPS, WARMUP_STEPS + pairs):
            for name, s in sides.items():
                present, _ = images_in(batches[name][i])
                t0 = time.perf_counter()
                step(s.trainer, batches[name][i])
                per_step[name].append((time.perf_counter() - t0) / present)
        # Loader + step: alternate windows of fresh loader epochs, A B B A A B ... (a steady drift of the machine's
        # load then favours neither side); samples in seconds per image.
        fed: dict[str, list[float]] = {"image": [], "multiview": [], "multiview (per slot)": []}
        for w in range(windows):
            for name in list(sides) if w % 2 == 0 else list(sides)[::-1]:
                seconds, present, slots = sides[name].window(steps)
                fed[name].append(seconds / present)
                if name == "multiview":
                    fed["multiview (per slot)"].append(seconds / slots)
        for s in sides.values():
            s.trainer.accelerator.end_training()
    mv = sides["multiview"]
    full = mv.present == mv.slots
    facts = {
        "model": cfg.MODEL.NAME,
        "img_size": cfg.DATA.IMG_SIZE,
        "image_batch": IMAGES_PER_STEP,
        "observations_per_step": IMAGES_PER_STEP // VIEWS,
        "views": VIEWS,
        "view_pooling": "mean",
        "workers": cfg.DATA.NUM_WORKERS,
        "photos": f"{ds.size[0]}x{ds.size[1]} JPEG",
        "train_images": len(train_rows["image"]),
    }
    # Each window pair ran back to back and shared the machine's momentary load (a shared 2-core machine changes it
    # from second to second): the target uses the median of per-pair ratios; the ratio of medians is shown beside it.
    ratio = median([i / m for i, m in zip(fed["image"], fed["multiview"], strict=True)])
    comps = []
    if pairs:
        paired = median([m / i for m, i in zip(per_step["multiview"], per_step["image"], strict=True)])
        comps.append(
            Comparison(
                name=f"multi-view vs image training, step only on batches in memory, {label} ({cfg.MODEL.NAME}, "
                f"{cfg.DATA.IMG_SIZE}px)",
                unit="s/img",
                samples=per_step,
                ratios={
                    "multiview/image (img/s, ratio of medians)": speedup(per_step["multiview"], per_step["image"]),
                    "multiview/image (img/s, median of per-step ratios)": 1.0 / paired,
                },
                facts=facts | {"steps": pairs},
            )
        )
    comps.append(
        Comparison(
            name=f"multi-view vs image training throughput, loader + step, {label} ({cfg.MODEL.NAME}, "
            f"{cfg.DATA.IMG_SIZE}px, batch {IMAGES_PER_STEP} images vs {IMAGES_PER_STEP // VIEWS} observations x "
            f"{VIEWS} views)",
            unit="s/img",
            samples=fed if not full else {k: fed[k] for k in ("image", "multiview")},
            ratios={
                "multiview/image (img/s, median of per-window-pair ratios)": ratio,
                "multiview/image (img/s, ratio of medians)": speedup(fed["multiview"], fed["image"]),
            }
            | ({} if full else {"multiview slots/image (img/s)": speedup(fed["multiview (per slot)"], fed["image"])}),
            # The target is set where the two sides do the same work: every view slot holds a real photo.
            targets=[Target("multi-view img/s >= 0.9x image training", ratio, 0.9)] if full else [],
            facts=facts | {"windows": windows, "steps_per_window": steps},
            notes=[
                f"multi-view images counted as present views: {mv.present} present of {mv.slots} view slots"
                + (
                    " (every observation has all K photos)"
                    if full
                    else "; the backbone computes every slot (static shapes), so empty slots cost as much as photos"
                )
            ],
        )
    )
    return comps


def run(quick: bool) -> list[Comparison]:
    set_threads(1)
    steps, windows, pairs = (6, 10, 12) if quick else (8, 16, 24)
    # The 85 % training split must hold a loader window (SKIP + steps batches) and the in-memory batches.
    observations = int(max(SKIP + steps, pairs + WARMUP_STEPS) * IMAGES_PER_STEP // VIEWS / 0.85) + 12
    with tempfile.TemporaryDirectory(prefix="linnaeus-bench-multiview-") as tmp:
        full = write_dataset(Path(tmp) / "full", observations)
        comps = measure(
            full, Path(tmp) / "out", label="4 photos per observation", steps=steps, windows=windows, pairs=pairs
        )
        # Observations of 2-4 photos (the demo's spread): reported, not targeted: a quarter of the slots are empty.
        mixed = write_dataset(Path(tmp) / "mixed", int(observations * 4 / 3), sizes=(2, VIEWS))
        comps += measure(
            mixed, Path(tmp) / "out", label="2-4 photos per observation", steps=steps, windows=max(3, windows // 2)
        )
    return comps


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import run_cli

    return run_cli(run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
