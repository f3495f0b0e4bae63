"""The real trainer on one GPU: ``python -m benchmarks.gpu_train --out train.json`` (< 8 min on an H100).

Each variant is a real ``accelerate launch -m linnaeus.train`` for a fixed number of steps on generated data, and
reads what the run itself logged (metrics.jsonl, config.yaml). Variants (in priority order; later ones are
skipped when the time budget would be exceeded):

- launcher: ``single_gpu.yaml`` (bf16), ``multi_gpu_ddp.yaml --num_processes 1`` (DDP, bf16) and
  ``zero2.yaml --num_processes 1`` (DeepSpeed ZeRO-2, bf16);
- ``DATA.DECODE``: ``cpu`` (decode + crop in loader workers) vs ``device`` (workers read bytes, the GPU decodes);
- ``MODEL.COMPILE``: eager vs compiled; image size 224 and 384;
- the other fast-step settings one at a time (``-no_cl``: ``MODEL.CHANNELS_LAST false``; ``-no_fused``:
  ``OPTIMIZER.FUSED false``) against the compiled device-decode run, to keep only what helps;
- data: photo-like JPEGs of ≤ 500 px and ~1 MP (``benchmarks.common.synth_images``), and WebDataset shards
  written by ``linnaeus shard`` from the ≤ 500 px set.

Per variant: images/s (median of the logged windows after warm-up), MFU (3x the forward FLOPs of the run's own
model from ``linnaeus.models.model_size``, against the datasheet bf16 peak and the measured bf16 matmul rate,
both from ``benchmarks.gpu``), the data-wait share and peak memory the trainer logs (``data_wait_share``,
``max_memory_gib`` in train rows), device-decode fallbacks, GPU utilisation (``nvidia-smi`` sampled twice a second
during the launch; the median of the samples in its second half, after start-up and compilation) and the wall
time of the launch. ``fed_vs_compute``
(1 - data-wait share) estimates end-to-end images/s against the same step fed from memory: the step's own time
is what remains when the waits for data are taken out. Each section is guarded as in ``benchmarks.gpu``: a
failure is recorded and the next variant runs; the JSON is rewritten after every section. A table closes the run.

``--smoke`` runs the same code on the CPU in well under a minute (tests use it): the demo-sized model at 32 px,
``cpu_ddp.yaml`` / ``cpu_zero2.yaml`` with one process standing in for the GPU launchers, two variants.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from benchmarks.gpu import ARCH, Recorder, env_info, make_plan, matmul_tflops, nominal_peak

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
DEMO = ROOT / "configs" / "experiments" / "demo.yaml"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


@dataclass(frozen=True)
class Variant:
    launcher: str  # "single" (bf16, no distribution), "ddp" (DDP, one process) or "zero2" (ZeRO-2, one process)
    decode: str  # DATA.DECODE
    compiled: bool
    img_size: int
    data: str  # "jpeg500", "jpeg1mp" or "shards"
    channels_last: bool = True  # MODEL.CHANNELS_LAST
    fused: bool = True  # OPTIMIZER.FUSED

    @property
    def name(self) -> str:
        mode = "compiled" if self.compiled else "eager"
        off = ("" if self.channels_last else "-no_cl") + ("" if self.fused else "-no_fused")
        return f"{self.launcher}-{self.data}-{self.img_size}-{self.decode}-{mode}{off}"


@dataclass(frozen=True)
class TrainPlan:
    smoke: bool
    steps: int
    log_every: int
    warmup_rows: int
    batch: dict[int, int]  # image size -> per-process batch
    workers: int
    unique_images: dict[str, int]  # distinct generated photos per data set (files are repeated by hard links)
    rows: int  # labels.h5 rows (enough for every step without a second epoch)
    launch_timeout: int
    variants: tuple[Variant, ...]


def _variants(smoke: bool) -> tuple[Variant, ...]:
    if smoke:
        return (
            Variant("single", "cpu", False, 32, "jpeg500"),
            Variant("zero2", "device", False, 32, "shards"),
        )
    v = Variant
    return (
        v("single", "cpu", False, 224, "jpeg500"),
        v("single", "device", False, 224, "jpeg500"),
        v("single", "device", True, 224, "jpeg500"),
        v("single", "cpu", True, 224, "jpeg500"),
        v("single", "device", True, 224, "jpeg500", channels_last=False),
        v("single", "device", True, 224, "jpeg500", fused=False),
        v("single", "cpu", False, 224, "jpeg1mp"),
        v("single", "device", False, 224, "jpeg1mp"),
        v("zero2", "device", True, 224, "jpeg500"),
        v("zero2", "cpu", False, 224, "jpeg500"),
        v("ddp", "device", False, 224, "jpeg500"),
        v("zero2", "device", False, 224, "jpeg500"),
        v("single", "device", True, 384, "jpeg500"),
        v("single", "cpu", True, 384, "jpeg500"),
        v("single", "cpu", False, 224, "shards"),
        v("single", "device", False, 224, "shards"),
    )


def make_train_plan(smoke: bool) -> TrainPlan:
    if smoke:
        return TrainPlan(True, 3, 1, 1, {32: 8}, 1, {"jpeg500": 6, "jpeg1mp": 0}, 48, 240, _variants(True))
    workers = min(8, os.cpu_count() or 1)  # the issue's target: <= 8 loader workers per GPU
    steps, batch = 30, {224: 256, 384: 96}
    return TrainPlan(
        False, steps, 5, 2, batch, workers, {"jpeg500": 96, "jpeg1mp": 48}, steps * 256, 420, _variants(False)
    )


# ------------------------------------------------------------------------------------------------------- data
def _photo(args: tuple[int, tuple[int, int]]) -> bytes:
    from benchmarks.common import synth_images

    seed, size = args
    return synth_images(1, size, seed=seed)[0]


def write_dataset(root: Path, rows: int, size: tuple[int, int] | None, unique: int) -> Path:
    """The demo labels.h5/taxonomy with ``rows`` rows; its images replaced by ``unique`` photos of ``size`` repeated
    through hard links (decode cost is per file read, so repeats measure the same work as distinct photos)."""
    from linnaeus.data.demo import SPECIES, write_demo_dataset

    per_species = max(1, -(-rows // len(SPECIES)))
    summary = write_demo_dataset(root, seed=0, per_species=per_species)
    if size is not None and unique > 0:
        with multiprocessing.get_context("spawn").Pool(min(16, os.cpu_count() or 1)) as pool:
            photos = pool.map(_photo, [(i, size) for i in range(unique)])
        sources = []
        for i, data in enumerate(photos):
            src = root / f"photo_{i:04d}.jpg"
            src.write_bytes(data)
            sources.append(src)
        images = sorted(Path(summary["images_dir"]).glob("*.jpg"))
        for i, path in enumerate(images):
            path.unlink()
            os.link(sources[i % len(sources)], path)
    return root


def write_shard_set(dataset: Path, out: Path, experiment: Path, workers: int) -> Path:
    from linnaeus.config import load_config
    from linnaeus.config.resolve_data import data_spec
    from linnaeus.data.shards.writer import ShardOptions, write_shards

    cfg = load_config(experiment, _data_opts(dataset))
    write_shards(
        data_spec(cfg),
        out,
        ShardOptions(samples_per_shard=256, workers=workers, splits=("train",), progress=False),
    )
    return out


def _data_opts(dataset: Path) -> list[str]:
    return [
        "DATA.H5.LABELS_PATH",
        str(dataset / "labels.h5"),
        "DATA.HYBRID.IMAGES_DIR",
        str(dataset / "images"),
        "DATA.TAXONOMY_PATH",
        str(dataset / "taxonomy.json"),
        "DATA.H5.TRAIN_VAL_SPLIT_RATIO",
        "0.98",
    ]


def write_experiment(folder: Path, smoke: bool) -> Path:
    """The demo experiment (data, heads, schedules) with mFormerV1_sm widths, or as it is for the smoke run."""
    path = folder / "experiment.yaml"
    doc: dict[str, Any] = {"BASE": [str(DEMO)]}
    if not smoke:
        arch = yaml.safe_load(ARCH.read_text())["MODEL"]
        doc["MODEL"] = {k: arch[k] for k in ("NAME", "CONVNEXT_STAGES", "ROPE_STAGES")} | {"DROP_PATH_RATE": 0.1}
    path.write_text(yaml.safe_dump(doc))
    return path


# ------------------------------------------------------------------------------------------------------ launch
def launch_args(plan: TrainPlan, launcher: str) -> list[str]:
    if plan.smoke:  # CPU stand-ins: one process, gloo / DeepSpeed on CPU
        config = "cpu_zero2.yaml" if launcher == "zero2" else "cpu_ddp.yaml"
        return ["--config_file", str(CONFIGS / config), "--num_processes", "1"]
    if launcher == "single":
        return ["--config_file", str(CONFIGS / "single_gpu.yaml")]
    config = "multi_gpu_ddp.yaml" if launcher == "ddp" else "zero2.yaml"
    return ["--config_file", str(CONFIGS / config), "--num_processes", "1"]


class GpuUtilisation:
    """``nvidia-smi``'s utilisation.gpu sampled every ``every`` seconds in a thread while a launch runs; None where
    there is no ``nvidia-smi`` (the CPU smoke run)."""

    def __init__(self, every: float = 0.5) -> None:
        import shutil
        import threading

        self.every = every
        self.samples: list[float] = []
        self._smi = shutil.which("nvidia-smi")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if self._smi else None

    def _run(self) -> None:
        cmd = [str(self._smi), "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "--id=0"]
        while not self._stop.wait(self.every):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip()
                self.samples.append(float(out.splitlines()[0]))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                continue  # a missed sample; the others still tell

    def __enter__(self) -> GpuUtilisation:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def steady_percent(self) -> float | None:
        """Median of the second half of the samples: start-up, data writing and compilation come first."""
        late = self.samples[len(self.samples) // 2 :]
        return statistics.median(late) if late else None


def run_variant(
    plan: TrainPlan, variant: Variant, experiment: Path, datasets: dict[str, Path], shards: Path | None, out: Path
) -> dict[str, Any]:
    source = datasets["jpeg500" if variant.data == "shards" else variant.data]
    batch = plan.batch[variant.img_size]
    opts = [
        *_data_opts(source),
        "EXPERIMENT.OUTPUT_DIR",
        str(out),
        "EXPERIMENT.NAME",
        variant.name,
        "DATA.IMG_SIZE",
        str(variant.img_size),
        "MODEL.IMG_SIZE",
        str(variant.img_size),
        "DATA.BATCH_SIZE",
        str(batch),
        "DATA.NUM_WORKERS",
        str(plan.workers),
        "DATA.DECODE",
        variant.decode,
        "MODEL.COMPILE",
        str(variant.compiled),
        "MODEL.CHANNELS_LAST",
        str(variant.channels_last),
        "OPTIMIZER.FUSED",
        str(variant.fused),
        "TRAIN.MAX_STEPS",
        str(plan.steps),
        "TRAIN.EPOCHS",
        "1000",
        "SCHEDULE.METRICS.LOG_INTERVAL_STEPS",
        str(plan.log_every),
        "SCHEDULE.VALIDATION.INTERVAL",
        "{STEPS: 1000000}",
        "SCHEDULE.VALIDATION.MASK_META_INTERVAL",
        "{STEPS: 1000000}",
        "SCHEDULE.CHECKPOINT.INTERVAL",
        "{STEPS: 1000000}",
    ]
    if variant.data == "shards":
        opts += ["DATA.SHARDS.ENABLED", "True", "DATA.SHARDS.DIR", str(shards)]
    cmd = [ACCELERATE, "launch", *launch_args(plan, variant.launcher), "-m", "linnaeus.train", "--cfg", str(experiment)]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    if plan.smoke:
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    with GpuUtilisation() as util:
        proc = subprocess.run(
            [*cmd, "--opts", *opts], cwd=ROOT, env=env, capture_output=True, text=True, timeout=plan.launch_timeout
        )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"launch failed ({proc.returncode}): {failure_line(proc.stderr or proc.stdout)}")
    runs = sorted(out.glob(f"*/*/{variant.name}"))
    if len(runs) != 1:
        raise RuntimeError(f"expected one run folder named {variant.name} under {out}, found {len(runs)}")
    return summarise(runs[0], plan, variant, batch) | {
        "launch_wall_s": round(wall, 1),
        "gpu_util_pct": util.steady_percent(),
    }


def failure_line(output: str) -> str:
    """The line that says why a launch failed: the CLI's ``error:`` line, else the last exception line of a rank
    (the launcher's own ChildFailedError report says nothing about the cause)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line
    for line in reversed(lines):
        text = line.split("]: ", 1)[-1] if line.startswith("[rank") else line
        if re.match(r"^[\w.]*(Error|Exception)\b", text) and "ChildFailedError" not in text:
            return text[:500]
    return " | ".join(lines[-4:])[:500]


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return statistics.median(values) if values else None


def summarise(run: Path, plan: TrainPlan, variant: Variant, batch: int) -> dict[str, Any]:
    """What the run logged, after dropping the warm-up windows (compilation, worker start-up, allocator growth)."""
    from linnaeus.config import load_config
    from linnaeus.config.resolve_model import model_spec
    from linnaeus.models import model_size

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("phase") == "train"]
    steady = train[plan.warmup_rows :] or train
    cfg = load_config(run / "config.yaml")
    meta_dims = [c.DIM for c in cfg.DATA.META.COMPONENTS.values() if c.ENABLED] if cfg.DATA.META.ACTIVE else []
    size = model_size(model_spec(cfg), meta_dims, variant.img_size)
    last = train[-1] if train else {}
    wait = _median(steady, "data_wait_share")
    return {
        "variant": variant.__dict__,
        "batch": batch,
        "logged_windows": len(train),
        "images_per_sec": _median(steady, "images_per_sec"),
        "data_wait_share": wait,
        "fed_vs_compute": None if wait is None else 1.0 - wait,
        "max_memory_gib": max((float(r["max_memory_gib"]) for r in train if "max_memory_gib" in r), default=None),
        "decode_fallbacks": last.get("decode_fallbacks"),
        "device_decode_wired": "decode_fallbacks" in last,
        "gmacs_fwd": size["gmacs"],
        "params_m": size["params"] / 1e6,
    }


def add_mfu(res: dict[str, Any], matmul_tflops_measured: float | None, peak: float | None) -> None:
    ips = res.get("images_per_sec")
    if not ips:
        return
    achieved = ips * 3 * 2 * res["gmacs_fwd"] * 1e9
    res["achieved_tflops"] = achieved / 1e12
    if peak:
        res["mfu_vs_nominal_peak"] = achieved / peak
    if matmul_tflops_measured:
        res["mfu_vs_measured_matmul"] = achieved / (matmul_tflops_measured * 1e12)


# ------------------------------------------------------------------------------------------------------- table
def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict[str, Any]) -> str:
    lines = [
        "| variant | img/s | MFU (peak) | MFU (matmul) | data wait | peak GiB | GPU util | fallbacks | launch s |",
        "|---|---|---|---|---|---|---|---|---|",  # fed / from memory = 1 - data wait
    ]
    for name, res in results.get("variants", {}).items():
        if "error" in res or "skipped" in res:
            lines.append(f"| {name} | {res.get('error') or res.get('skipped')} ||||||||")
            continue
        lines.append(
            f"| {name} | {_fmt(res.get('images_per_sec'), ',.0f')} | {_fmt(res.get('mfu_vs_nominal_peak'), '.1%')} "
            f"| {_fmt(res.get('mfu_vs_measured_matmul'), '.1%')} | {_fmt(res.get('data_wait_share'), '.0%')} "
            f"| {_fmt(res.get('max_memory_gib'), '.1f')} | {_fmt(res.get('gpu_util_pct'), '.0f')}"
            f"{'' if res.get('gpu_util_pct') is None else '%'} | {_fmt(res.get('decode_fallbacks'), '.0f')} "
            f"| {_fmt(res.get('launch_wall_s'), '.0f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_train.json"))
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, two variants (tests)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds; variants that would not fit are skipped")
    p.add_argument("--only", default="", help="comma-separated substrings of variant names to run")
    p.add_argument("--variants", default="", help="comma-separated exact variant names, run in this order")
    args = p.parse_args(argv)

    plan = make_train_plan(args.smoke)
    if args.variants:
        by_name = {v.name: v for v in plan.variants}
        names = [s.strip() for s in args.variants.split(",") if s.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            p.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(by_name)}")
        plan = replace(plan, variants=tuple(by_name[n] for n in names))
    if args.only:
        keep = [s.strip() for s in args.only.split(",") if s.strip()]
        plan = replace(plan, variants=tuple(v for v in plan.variants if any(k in v.name for k in keep)))
    gpu_plan = make_plan(args.smoke)
    rec = Recorder(args.out, args.budget)
    rec.results["env"] = env_info(gpu_plan)
    rec.results["plan"] = {"steps": plan.steps, "batch": plan.batch, "workers": plan.workers}
    with rec.section("matmul"):
        rec.results["matmul"] = matmul_tflops(gpu_plan)
    matmul = rec.results.get("matmul", {}).get("tflops")
    peak = nominal_peak(rec.results["env"].get("gpu", ""))
    variants: dict[str, Any] = rec.results.setdefault("variants", {})
    longest = 0.0
    with tempfile.TemporaryDirectory(prefix="linnaeus-gpu-train-") as tmp_name:
        tmp = Path(tmp_name)
        experiment = write_experiment(tmp, plan.smoke)
        datasets: dict[str, Path] = {}
        with rec.section("data"):
            needed = {v.data for v in plan.variants}
            sizes = {"jpeg500": (480, 360), "jpeg1mp": (1152, 864)}
            for key in ("jpeg500", "jpeg1mp"):
                if key in needed or (key == "jpeg500" and "shards" in needed):
                    size = None if plan.smoke and key == "jpeg500" else sizes[key]
                    datasets[key] = write_dataset(tmp / key, plan.rows, size, plan.unique_images[key])
        shards: Path | None = None
        if any(v.data == "shards" for v in plan.variants) and "jpeg500" in datasets:
            with rec.section("shards"):
                workers = 1 if plan.smoke else min(8, os.cpu_count() or 1)
                shards = write_shard_set(datasets["jpeg500"], tmp / "shards", experiment, workers)
        for variant in plan.variants:
            if rec.left() < max(longest, 15.0):
                variants[variant.name] = {"skipped": f"time budget ({rec.left():.0f} s left)"}
                rec.log(f"skip {variant.name}: budget")
                continue
            if variant.data not in datasets and not (variant.data == "shards" and shards is not None):
                variants[variant.name] = {"skipped": "its data could not be written"}
                continue
            with rec.section(variant.name, variants, variant.name):
                res = run_variant(plan, variant, experiment, datasets, shards, tmp / "runs")
                add_mfu(res, matmul, peak)
                variants[variant.name] = res
                longest = max(longest, res["launch_wall_s"])
                rec.log(f"{variant.name}: {_fmt(res['images_per_sec'], ',.0f')} img/s")
    rec.results["table"] = table(rec.results)
    rec.save()
    print(rec.results["table"])
    return 1 if rec.results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
