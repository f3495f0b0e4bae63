"""Shared pieces of the benchmark suite: interleaved timing, medians and ratios, printing, synthetic data.

Every comparison runs its variants in the same process and the same minutes, alternating A B A B ..., and reports
the median of each variant and the ratio of medians. On a shared 2-core machine absolute numbers drift by tens of
percent between minutes, while the ratio of interleaved medians moves much less: read the ratios.
"""

from __future__ import annotations

import io
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = ROOT / "configs" / "experiments" / "demo.yaml"

# ~1 MP phone/camera photos and iNat2021/ImageNet-size images (≤ 500 px on the long side).
SIZE_1MP = (1152, 864)
SIZE_500PX = (500, 375)
JPEG_QUALITY = 90


# ---------------------------------------------------------------------------------------------------- timing
def interleave(variants: dict[str, Callable[[], float | None]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each variant ``warmup`` times untimed, then ``reps`` rounds of A B C ..., one call of each per round.

    A variant returns the quantity it measured itself (e.g. seconds per image, so setup such as worker start-up
    can be left out) or None, in which case the call's wall time is the sample. Alternating the variants spreads
    slow drift (other jobs, thermal, page cache) evenly over them, which back-to-back blocks would not.
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            value = fn()
            samples[name].append(time.perf_counter() - t0 if value is None else float(value))
    return samples


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no samples")
    return float(statistics.median(values))


def stats(values: Sequence[float]) -> dict[str, float]:
    return {"min": float(min(values)), "median": median(values), "max": float(max(values)), "n": len(values)}


def speedup(fast: Sequence[float], slow: Sequence[float]) -> float:
    """How many times faster ``fast`` is than ``slow``, both given as times (seconds per unit): the ratio of the
    medians ``median(slow) / median(fast)``. > 1 means ``fast`` really is faster."""
    return median(slow) / median(fast)


def overhead(ours: Sequence[float], base: Sequence[float]) -> float:
    """Extra time of ``ours`` over ``base`` as a fraction (0.05 = 5 % slower), from median times."""
    return median(ours) / median(base) - 1.0


# ---------------------------------------------------------------------------------------------------- reporting
@dataclass
class Target:
    """A pass/fail line: ``value`` compared with ``threshold`` (``higher`` = value must be >= threshold)."""

    label: str
    value: float
    threshold: float
    higher: bool = True

    @property
    def met(self) -> bool:
        return self.value >= self.threshold if self.higher else self.value <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "value": self.value,
            "threshold": self.threshold,
            "higher": self.higher,
            "met": self.met,
        }


@dataclass
class Comparison:
    """One side-by-side measurement: per-variant samples in ``unit`` (seconds per image or per step), ratios of
    medians, optional targets, and free-form facts (sizes, worker counts) that make the numbers reproducible."""

    name: str
    unit: str  # "s/img" or "s/step"; printed as a rate too
    samples: dict[str, list[float]]
    ratios: dict[str, float] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    items_per_unit: int = 1  # images per step, so s/step rows can also print img/s

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "stats": {k: stats(v) for k, v in self.samples.items() if v},
            "samples": self.samples,
            "ratios": self.ratios,
            "targets": [t.to_dict() for t in self.targets],
            "facts": self.facts,
            "notes": self.notes,
            "items_per_unit": self.items_per_unit,
        }


def _rate(seconds: float, comp: Comparison) -> str:
    per_s = comp.items_per_unit / seconds if seconds > 0 else math.inf
    return f"{per_s:9.1f} img/s"


def format_comparison(comp: Comparison) -> str:
    lines = [f"-- {comp.name}"]
    if comp.facts:
        lines.append("   " + ", ".join(f"{k}={v}" for k, v in comp.facts.items()))
    scale, shown = (1000.0, "ms") if comp.unit.startswith("s/") else (1.0, comp.unit)
    per = comp.unit.split("/", 1)[1] if "/" in comp.unit else ""
    width = max([len(k) for k in comp.samples] + [7])
    lines.append(
        f"   {'variant':<{width}}  {'min':>9} {'median':>9} {'max':>9}  {shown + '/' + per:<8} {'rate':>15}  n"
    )
    for name, vals in comp.samples.items():
        if not vals:
            lines.append(f"   {name:<{width}}  (no samples)")
            continue
        s = stats(vals)
        lines.append(
            f"   {name:<{width}}  {s['min'] * scale:9.2f} {s['median'] * scale:9.2f} {s['max'] * scale:9.2f}  "
            f"{'':<8} {_rate(s['median'], comp)}  {s['n']}"
        )
    for label, value in comp.ratios.items():
        lines.append(f"   ratio {label} = {value:.3f}")
    for t in comp.targets:
        op = ">=" if t.higher else "<="
        lines.append(f"   target {t.label}: {t.value:.3f} {op} {t.threshold:g} -> {'MET' if t.met else 'MISSED'}")
    lines += [f"   note: {n}" for n in comp.notes]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Enough about the machine and software to tell two result files apart."""
    import PIL
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }


def set_threads(n: int = 1) -> None:
    """Pin intra-op threads: one per process, like a DataLoader worker or one DDP rank on a 2-core machine."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------- data
def _canvas(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like uint8 image (gradients, blobs, fine texture, sensor noise): JPEG sizes and decode work are
    realistic, unlike flat synthetic images that compress to almost nothing."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(5, 60), rng.uniform(5, 60), rng.uniform(0, 6.3)
        img[..., c] = 120 + 60 * np.sin(xx / fx + ph) * np.cos(yy / fy) + rng.uniform(-40, 40) * xx / width
    for _ in range(12):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.03, 0.2) * min(width, height)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def synth_images(count: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """``count`` distinct, deterministic JPEGs of ``size`` (width, height).

    Drawing a full photo-like image costs ~0.2 s at 1 MP; instead one canvas 1.5x larger is drawn and each image
    is a different window of it with its own colour gain and orientation, which costs only the JPEG encode.
    """
    width, height = size
    canvas = _canvas(int(width * 1.5), int(height * 1.5), seed)
    rng = np.random.default_rng((seed, 1))
    out = []
    for _ in range(count):
        x0 = int(rng.integers(0, canvas.shape[1] - width + 1))
        y0 = int(rng.integers(0, canvas.shape[0] - height + 1))
        tile = canvas[y0 : y0 + height, x0 : x0 + width]
        if rng.random() < 0.5:
            tile = tile[:, ::-1]
        gain = rng.uniform(0.8, 1.2, 3).astype(np.float32)
        tile = np.clip(tile.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        out.append(jpeg_bytes(np.ascontiguousarray(tile)))
    return out


def write_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0, prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(synth_images(count, size, seed)):
        path = folder / f"{prefix}_{i:06d}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths


@dataclass
class BenchDataset:
    """A dataset in the real on-disk layout (labels.h5 with taxa and metadata, taxonomy.json, images/)."""

    root: Path
    num_images: int
    size: tuple[int, int]

    @property
    def labels(self) -> Path:
        return self.root / "labels.h5"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def taxonomy(self) -> Path:
        return self.root / "taxonomy.json"

    def opts(self, **overrides: Any) -> list[str]:
        """``--opts`` pointing the demo experiment at this dataset, plus ``overrides`` (``DATA__IMG_SIZE=224``)."""
        import json

        opts: dict[str, Any] = {
            "DATA.H5.LABELS_PATH": str(self.labels),
            "DATA.HYBRID.IMAGES_DIR": str(self.images),
            "DATA.TAXONOMY_PATH": str(self.taxonomy),
        }
        opts.update({k.replace("__", "."): v for k, v in overrides.items()})
        flat: list[str] = []
        for k, v in opts.items():
            flat += [k, v if isinstance(v, str) else json.dumps(v)]
        return flat

    def config(self, **overrides: Any):
        from linnaeus.config import load_config

        return load_config(DEMO_CFG, self.opts(**overrides))


def write_bench_dataset(root: Path, num_images: int, size: tuple[int, int] | None, seed: int = 0) -> BenchDataset:
    """The demo dataset's labels.h5/taxonomy (12 species, 3 ranks, metadata, a few nulls) with ``num_images`` rows
    rounded up to a multiple of 12, its small drawings replaced by ``size`` photos when ``size`` is given."""
    from linnaeus.data.demo import IMAGE_PX, SPECIES, write_demo_dataset

    per_species = max(1, math.ceil(num_images / len(SPECIES)))
    summary = write_demo_dataset(root, seed=seed, per_species=per_species)
    n = summary["num_images"]
    if size is not None:
        images = Path(summary["images_dir"])
        names = sorted(p.name for p in images.glob("*.jpg"))
        for name, data in zip(names, synth_images(n, size, seed), strict=True):
            (images / name).write_bytes(data)
    return BenchDataset(root=root, num_images=n, size=size or (IMAGE_PX, IMAGE_PX))


def run_cli(run: Callable[[bool], list[Comparison]], doc: str | None, argv: list[str] | None = None) -> int:
    """The command line every suite module shares: ``[--quick]``, then print each comparison."""
    import argparse

    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    for comp in run(args.quick):
        print(format_comparison(comp), flush=True)
    return 0
