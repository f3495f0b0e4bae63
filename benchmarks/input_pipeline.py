"""Input pipeline: our file loader against a naive per-image loader and against the per-worker decode ceiling.

- ``ours``: ``FileDataset`` (from ``prepare_data`` on a real labels.h5) + ``build_loader``: reduced-size JPEG decode
  of the planned crop, uint8 batches (float conversion and flips happen later, on the training device);
- ``naive``: what an ImageFolder + torchvision-transforms pipeline does per image: open, full decode, crop, resize,
  flip, convert to a normalised float tensor; same files, labels, metadata, crops, batch size and workers;
- ``ceiling``: ``FileDataset.load`` in a bare loop in this process, no DataLoader: the most one worker can do.

All three use the same crop boxes (``sample_rng(seed, 0, index)``), so they do the same geometric work. Ratios:
``ours/naive`` (target >= 1, aim >= 2 on ~1 MP JPEGs) and the per-worker efficiency
``(ours img/s / workers) / ceiling img/s`` (target >= 0.8).

Decode paths on a CPU training device (``compare_decode_paths``): the same loader with ``DATA.DECODE cpu`` against
``DATA.DECODE device`` as it runs when training on the CPU (workers plan the crop, decode with torchvision and
resize with ``resize_boxes``; the main process's ``DeviceDecoder`` only counts). The device/cpu ratio is reported,
not targeted: device decode is a GPU feature (``DATA.DECODE auto`` picks the CPU decoder without CUDA).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from benchmarks.common import (
    SIZE_1MP,
    SIZE_500PX,
    BenchDataset,
    Comparison,
    Target,
    interleave,
    median,
    set_threads,
    speedup,
    synth_images,
    write_bench_dataset,
)
from linnaeus.config.resolve_data import data_spec
from linnaeus.data.dataset import sample_rng
from linnaeus.data.images import RESAMPLE, random_resized_crop_box

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class NaiveDataset(Dataset):
    """The baseline: per-image PIL work with torchvision semantics, float output from the worker.

    Train: crop the random-resized-crop box of the full decode and resize it (``RandomResizedCrop``), flip with
    ``hflip`` probability. Val: resize the shorter side to ``int(img_size / crop_pct)``, centre crop (``Resize`` +
    ``CenterCrop``). Then ``ToTensor`` + ``Normalize``. Crops come from ``sample_rng(seed, 0, index)`` so they match
    our loader's epoch-0 crops exactly.
    """

    def __init__(
        self,
        paths: Sequence[str],
        targets: dict[str, np.ndarray],
        meta: np.ndarray,
        *,
        img_size: int,
        train: bool,
        rrc_scale: tuple[float, float],
        rrc_ratio: tuple[float, float],
        crop_pct: float,
        seed: int,
        hflip: float = 0.5,
    ) -> None:
        self.paths = list(paths)
        self.targets = targets
        self.meta = meta
        self.img_size = img_size
        self.train = train
        self.rrc_scale = rrc_scale
        self.rrc_ratio = rrc_ratio
        self.crop_pct = crop_pct
        self.seed = seed
        self.hflip = hflip
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def _val(self, im: Image.Image) -> Image.Image:
        w, h = im.size
        short = int(self.img_size / self.crop_pct)
        new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        im = im.resize(new, RESAMPLE)
        left = round((new[0] - self.img_size) / 2.0)
        top = round((new[1] - self.img_size) / 2.0)
        return im.crop((left, top, left + self.img_size, top + self.img_size))

    def image(self, index: int) -> torch.Tensor:
        im = Image.open(self.paths[index]).convert("RGB")  # full-size decode
        if self.train:
            rng = sample_rng(self.seed, 0, index)
            box = random_resized_crop_box(im.size[0], im.size[1], rng, self.rrc_scale, self.rrc_ratio)
            im = im.crop(box).resize((self.img_size, self.img_size), RESAMPLE)
            if rng.random() < self.hflip:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            im = self._val(im)
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self.image(index),
            "meta": torch.from_numpy(self.meta[index].copy()),
            "targets": {k: torch.tensor(v[index], dtype=torch.int64) for k, v in self.targets.items()},
        }


def naive_loader(dataset: NaiveDataset, batch_size: int, workers: int, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)),
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )


def build_pair(ds: BenchDataset, *, img_size: int, batch_size: int, workers: int, train: bool, seed: int = 0):
    """(our dataset, our loader, our sampler, the naive dataset, its loader) over the same prepared split."""
    from linnaeus.data.loader import build_loader
    from linnaeus.data.prepare import prepare_data

    cfg = ds.config(
        DATA__IMG_SIZE=img_size,
        MODEL__IMG_SIZE=img_size,
        DATA__VAL_CROP_PCT=0.875,
        AUG__RRC_SCALE=[0.35, 1.0],
        MISC__SEED=seed,
    )
    data = prepare_data(data_spec(cfg))
    ours = data.dataset("train", train=train)
    # Persistent workers on both sides: every timed epoch measures decoding, not process start-up.
    loader, sampler = build_loader(
        ours,
        batch_size=batch_size,
        num_workers=workers,
        shuffle=True,
        seed=seed,
        drop_last=True,
        persistent_workers=True,
    )
    naive = NaiveDataset(
        [ours.path(i) for i in range(len(ours))],
        ours.targets,
        ours.meta,
        img_size=img_size,
        train=train,
        rrc_scale=ours.rrc_scale,
        rrc_ratio=ours.rrc_ratio,
        crop_pct=ours.val_crop_pct,
        seed=ours.seed,
    )
    return ours, loader, sampler, naive, naive_loader(naive, batch_size, workers, seed)


def _epoch_seconds_per_image(loader: DataLoader, before=None) -> float:
    if before is not None:
        before()
    n = 0
    t0 = time.perf_counter()
    for batch in loader:
        n += batch["image"].shape[0]
    return (time.perf_counter() - t0) / max(n, 1)


def compare_loaders(
    ds: BenchDataset, *, label: str, img_size: int, batch_size: int, workers: int, reps: int
) -> Comparison:
    ours, loader, sampler, _, naive = build_pair(
        ds, img_size=img_size, batch_size=batch_size, workers=workers, train=True
    )
    order = list(range(len(ours)))

    def ceiling() -> float:
        t0 = time.perf_counter()
        for i in order:
            ours.load(i, 0)
        return (time.perf_counter() - t0) / len(order)

    samples = interleave(
        {
            # Epoch 0 every time: the same crops as the naive loader and as the ceiling loop.
            "ours": lambda: _epoch_seconds_per_image(loader, lambda: sampler.set_epoch(0)),
            "naive": lambda: _epoch_seconds_per_image(naive),
            "ceiling": ceiling,
        },
        reps=reps,
    )
    ours_vs_naive = speedup(samples["ours"], samples["naive"])
    per_worker = median(samples["ceiling"]) / (median(samples["ours"]) * max(workers, 1))
    comp = Comparison(
        name=f"input pipeline, {label} JPEGs -> {img_size}px train crops, {workers} worker(s)",
        unit="s/img",
        samples=samples,
        ratios={"ours/naive (img/s)": ours_vs_naive, "ours per worker / ceiling": per_worker},
        targets=[
            Target("ours/naive >= 1.0", ours_vs_naive, 1.0),
            Target("ours per worker / decode ceiling >= 0.8", per_worker, 0.8),
        ],
        facts={"images": len(ours), "batch": batch_size, "workers": workers, "img_size": img_size},
    )
    if label == "1MP":
        comp.targets.append(Target("ours/naive on ~1 MP >= 2.0 (aim)", ours_vs_naive, 2.0))
    if workers >= (torch.multiprocessing.cpu_count() or 1):
        comp.notes.append(
            "workers >= cores: the main process (collate, pinning) competes with the workers, so the per-worker "
            "figure is a lower bound"
        )
    return comp


def compare_decode_paths(
    ds: BenchDataset, *, label: str, img_size: int, batch_size: int, workers: int, reps: int
) -> Comparison:
    """The real training loader with ``decode="cpu"`` against the device-decode path on a CPU device."""
    from linnaeus.data.device_decode import DeviceDecoder, resolve_decode_mode
    from linnaeus.data.loader import build_loader
    from linnaeus.data.prepare import prepare_data

    cfg = ds.config(DATA__IMG_SIZE=img_size, MODEL__IMG_SIZE=img_size, AUG__RRC_SCALE=[0.35, 1.0], MISC__SEED=0)
    data = prepare_data(data_spec(cfg))
    decoder = DeviceDecoder()
    variants = {}
    for name, mode in (("cpu", "cpu"), ("device", "device")):
        dataset = data.dataset("train", train=True, decode=resolve_decode_mode(mode, "cpu"))
        loader, sampler = build_loader(
            dataset, batch_size=batch_size, num_workers=workers, shuffle=True, seed=0, persistent_workers=True
        )

        def epoch(loader=loader, sampler=sampler) -> float:
            sampler.set_epoch(0)
            n, t0 = 0, time.perf_counter()
            for batch in loader:
                n += decoder.decode(batch, "cpu")["image"].shape[0]  # the trainer's call; a no-op for cpu batches
            return (time.perf_counter() - t0) / max(n, 1)

        variants[name] = epoch
    samples = interleave(variants, reps=reps)
    ratio = speedup(samples["device"], samples["cpu"])
    return Comparison(
        name=f"decode paths on a CPU device, {label} JPEGs -> {img_size}px train crops, {workers} worker(s)",
        unit="s/img",
        samples=samples,
        ratios={"device/cpu (img/s)": ratio},
        facts={"images": len(data.view("train").rows), "batch": batch_size, "workers": workers, "img_size": img_size},
        notes=[f"decoded by the device path: {decoder.decoded}, fallbacks: {decoder.fallbacks}"],
    )


# ------------------------------------------------------------------------------------------------ other decoders
def _available_decoders() -> dict[str, Any]:
    """Optional JPEG decoders, when installed (none of them is a dependency)."""
    found: dict[str, Any] = {}
    if importlib.util.find_spec("simplejpeg"):
        import simplejpeg

        found["simplejpeg"] = lambda data: simplejpeg.decode_jpeg(data, colorspace="RGB")
    if importlib.util.find_spec("turbojpeg"):
        from turbojpeg import TJPF_RGB, TurboJPEG

        tj = TurboJPEG()
        found["turbojpeg"] = lambda data: tj.decode(data, pixel_format=TJPF_RGB)
    if importlib.util.find_spec("cv2"):
        import cv2

        found["opencv"] = lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if importlib.util.find_spec("torchvision"):
        try:
            from torchvision.io import decode_jpeg

            found["torchvision"] = lambda data: decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except Exception:  # a torchvision built for another torch fails at import; then it is simply absent
            pass
    return found


def compare_decoders(count: int, reps: int) -> Comparison | None:
    """Full-size decode of ~1 MP JPEGs in RAM: Pillow vs every other installed decoder (None if none is)."""
    others = _available_decoders()
    if not others:
        return None
    blobs = synth_images(count, SIZE_1MP, seed=3)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        for b in blobs:
            fn(b)
        return (time.perf_counter() - t0) / len(blobs)

    def pillow(data: bytes) -> np.ndarray:
        import io

        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    variants = {"pillow": lambda: timed(pillow)} | {k: (lambda f=f: timed(f)) for k, f in others.items()}
    samples = interleave(variants, reps=reps)
    return Comparison(
        name="full decode of ~1 MP JPEGs in RAM, 1 thread: other decoders vs Pillow",
        unit="s/img",
        samples=samples,
        ratios={f"{k}/pillow (img/s)": speedup(samples[k], samples["pillow"]) for k in others},
        facts={"images": count},
    )


# ------------------------------------------------------------------------------------------------ entry points
def run(quick: bool, workers: list[int] | None = None) -> list[Comparison]:
    """Both image sets with 1 worker (one worker process and a nearly idle main process fit 2 cores, so the
    per-worker figure is clean); the full run adds the 1 MP set with 2 workers (workers = cores)."""
    set_threads(1)
    count = 72 if quick else 240
    reps = 3 if quick else 5
    cores = torch.multiprocessing.cpu_count() or 1
    plan = [("1MP", SIZE_1MP, w) for w in (workers or ([1] if quick else sorted({1, min(2, cores)})))]
    plan += [("500px", SIZE_500PX, (workers or [1])[0])]
    comps: list[Comparison] = []
    with tempfile.TemporaryDirectory(prefix="linnaeus-bench-input-") as tmp:
        sets: dict[str, BenchDataset] = {}
        for label, size, w in plan:
            if label not in sets:
                sets[label] = write_bench_dataset(Path(tmp) / label, count, size, seed=0)
            comps.append(compare_loaders(sets[label], label=label, img_size=224, batch_size=16, workers=w, reps=reps))
        for label in sets:
            comps.append(
                compare_decode_paths(sets[label], label=label, img_size=224, batch_size=16, workers=1, reps=reps)
            )
    dec = compare_decoders(16 if quick else 48, reps)
    if dec is not None:
        comps.append(dec)
    return comps


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import format_comparison

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workers", type=int, nargs="+", default=None)
    args = p.parse_args(argv)
    for comp in run(args.quick, args.workers):
        print(format_comparison(comp), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
