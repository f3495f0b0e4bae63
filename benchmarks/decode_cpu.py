"""Per-worker image decode cost: our ``load_image`` against a bare loop of the same decode and resize.

One process = one DataLoader worker. Two sets of deterministic synthetic JPEGs are written to a temporary folder:
~1 MP photos (1152×864) and iNat/ImageNet-size ones (500×375). For each set, interleaved passes (A B C D A B C D
...) time:

- ``ours_val``    ``load_image(train=False)``: read bytes, EXIF check, draft decode, centre box resize, CHW;
- ``ours_train``  ``load_image(train=True)``: the same with a random-resized-crop (its own draft factor);
- ``tight``       a minimal loop of the same draft decode + centre box resize (the ceiling for ``ours_val``);
- ``no_draft``    full-size decode + the same resize (what reduced-size decoding saves).

Prints min/median/max ms per image and img/s, and the ratios of medians: ours_val/tight is our overhead
(expect ≈ 1.0), no_draft/tight is the draft speed-up. Absolute numbers depend on the machine; read the ratios.

    .venv/bin/python -m benchmarks.decode_cpu --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one worker = one thread, as in a DataLoader worker

import numpy as np
import PIL
from PIL import Image

from linnaeus.data.images import RESAMPLE, _fast_scaled_decode, load_image

SETS = {"1MP": (1152, 864), "500px": (500, 375)}


def synth_jpeg(width: int, height: int, seed: int) -> bytes:
    """Photo-like content (gradients, blobs, texture, noise) so file sizes and decode work are realistic."""
    from benchmarks.common import _canvas, jpeg_bytes

    return jpeg_bytes(_canvas(width, height, seed), quality=90)


def tight_decode_resize(path: str, size: int, crop_pct: float, draft: bool = True) -> np.ndarray:
    """The same draft decode and centre-box resize as ``load_image(train=False)``, nothing else."""
    im = Image.open(path)
    w, h = im.size
    short = min(w, h)
    target_short = size / crop_pct
    if draft and 2 * target_short <= short:
        im.draft("RGB", (math.ceil(w * target_short / short), math.ceil(h * target_short / short)))
        _fast_scaled_decode(im)  # the same libjpeg settings load_image uses for a scaled decode
    im = im.convert("RGB")
    s = w / im.size[0]
    side = short * crop_pct
    box = ((w - side) / 2 / s, (h - side) / 2 / s, (w + side) / 2 / s, (h + side) / 2 / s)
    return np.asarray(im.resize((size, size), RESAMPLE, box=box, reducing_gap=None))


def time_pass(fn: Callable[[int, str], object], paths: list[str]) -> float:
    """Milliseconds per image for one pass over ``paths``."""
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        fn(i, p)
    return (time.perf_counter() - t0) * 1000.0 / len(paths)


def run(count: int, reps: int, img_size: int, crop_pct: float) -> dict:
    variants: dict[str, Callable[[int, str], object]] = {
        "ours_val": lambda i, p: load_image(p, img_size=img_size, train=False, rng=None, val_crop_pct=crop_pct),
        "ours_train": lambda i, p: load_image(p, img_size=img_size, train=True, rng=np.random.default_rng(i)),
        "tight": lambda i, p: tight_decode_resize(p, img_size, crop_pct),
        "no_draft": lambda i, p: tight_decode_resize(p, img_size, crop_pct, draft=False),
    }
    report: dict = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "img_size": img_size,
        "count": count,
        "reps": reps,
        "sets": {},
    }
    with tempfile.TemporaryDirectory(prefix="linnaeus-decode-") as tmp:
        for set_name, (w, h) in SETS.items():
            paths = []
            for i in range(count):
                p = Path(tmp) / f"{set_name}_{i:04d}.jpg"
                p.write_bytes(synth_jpeg(w, h, seed=i))
                paths.append(str(p))
            for fn in variants.values():  # warm-up: page cache, imports, allocator
                time_pass(fn, paths[: max(2, count // 10)])
            samples: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(reps):
                for name, fn in variants.items():  # interleaved so drift hits every variant alike
                    samples[name].append(time_pass(fn, paths))
            med = {k: statistics.median(v) for k, v in samples.items()}
            mean_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
            report["sets"][set_name] = {
                "size": [w, h],
                "mean_file_kb": round(mean_kb, 1),
                "ms_per_image": {k: {"min": min(v), "median": med[k], "max": max(v)} for k, v in samples.items()},
                "ratios": {
                    "ours_val/tight": med["ours_val"] / med["tight"],
                    "ours_train/tight": med["ours_train"] / med["tight"],
                    "no_draft/tight": med["no_draft"] / med["tight"],
                },
            }
    return report


def print_report(report: dict) -> None:
    print(
        f"decode_cpu: 1 process (= 1 worker), img_size {report['img_size']}, {report['count']} images/set, "
        f"{report['reps']} interleaved reps, Pillow {report['pillow']}, {report['cpu']}"
    )
    for set_name, r in report["sets"].items():
        print(f"\n[{set_name}] {r['size'][0]}x{r['size'][1]}, mean {r['mean_file_kb']} KB")
        print(f"  {'variant':<11} {'min ms':>8} {'median ms':>10} {'max ms':>8} {'img/s':>8}")
        for name, t in r["ms_per_image"].items():
            print(f"  {name:<11} {t['min']:8.2f} {t['median']:10.2f} {t['max']:8.2f} {1000 / t['median']:8.0f}")
        print("  ratios of medians: " + ", ".join(f"{k} = {v:.2f}" for k, v in r["ratios"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="24 images per set, 5 reps (about 10 s on 2 cores)")
    parser.add_argument("--count", type=int, default=100, help="images per set")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--crop-pct", type=float, default=0.875)
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    count, reps = (24, 5) if args.quick else (args.count, args.reps)
    report = run(count, reps, args.img_size, args.crop_pct)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
