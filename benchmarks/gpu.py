"""GPU check (one H100, under 7 minutes): ``python -m benchmarks.gpu --out results.json`` from the repo root.

Sections, each guarded (a failure is recorded in the JSON and the next section runs) and the JSON rewritten after
each, so a killed run still leaves what it measured:

1. ``matmul``      achievable bf16 TFLOP/s (8192³ products);
2. ``model``       mFormerV1_sm training step (uint8 input normalised on the GPU, bf16 autocast, channels_last,
                   fused AdamW): images/s and MFU at 224 and 384 px, eager and ``torch.compile``'d; MFU counts a
                   step as 3× the forward FLOPs measured by ``torch.utils.flop_counter`` (``model_size``), against
                   both the nominal dense bf16 peak and the measured matmul rate; plus timm's coatnet_nano_rw_224
                   (a hybrid conv/attention model of similar GMACs) when timm is installed;
3. ``loader``      our CPU loader (FileDataset + build_loader, N workers, 224-px train crops) vs batched GPU JPEG
                   decode (``torchvision.io.decode_jpeg(device="cuda")``) + GPU crop/resize, on ≤500 px and ~1 MP
                   JPEGs; "unavailable" without torchvision;
4. ``end_to_end``  CPU loader feeding the (eager) training step: images/s and the share of step time waiting
                   for data.

The compiled runs come last (their compile time is the least predictable part) and each starts only while the
time budget allows.

Everything is generated here (synthetic JPEGs, random weights); nothing is downloaded. ``--smoke`` runs the same
code on CPU with tiny sizes in seconds (tests use it).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
ARCH = ROOT / "configs" / "model" / "archs" / "mFormerV1" / "mFormerV1_sm.yaml"
DEMO = ROOT / "configs" / "experiments" / "demo.yaml"
META_DIMS = [2, 3, 10]  # temporal, spatial, elevation: the usual metadata components
NUM_CLASSES = {"taxa_L10": 10000, "taxa_L20": 2000, "taxa_L30": 300}  # iNat-scale heads
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense tensor-core peaks, FLOP/s
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Plan:
    """Sizes for a real GPU run and for the CPU smoke run."""

    device: str
    matmul_n: int
    sizes: dict[int, int]  # resolution -> batch
    warmup: int
    iters: int
    compile: bool
    images_500: int
    images_1mp: int
    loader_batch: int
    loader_img: int
    workers: int
    e2e_steps: int
    tiny_model: bool


def make_plan(smoke: bool) -> Plan:
    if smoke:
        return Plan("cpu", 128, {64: 2}, 1, 2, False, 8, 4, 4, 64, 1, 3, True)
    workers = min(16, os.cpu_count() or 1)
    return Plan("cuda", 8192, {224: 256, 384: 96}, 5, 20, True, 1536, 768, 256, 224, workers, 30, False)


# --------------------------------------------------------------------------------------------------- recording
class Recorder:
    """Results dict + progress printing; the JSON is rewritten (temp + rename) after every section."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.results: dict[str, Any] = {"errors": [], "skipped": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        self.results["seconds"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        tmp.replace(self.out)

    @contextlib.contextmanager
    def section(self, name: str, slot: dict[str, Any] | None = None, key: str | None = None) -> Iterator[None]:
        """Run a block; on failure record ``{"error": ...}`` at ``slot[key]`` (default: results[name]) and go on."""
        self.log(f"start {name}")
        try:
            yield
        except Exception as err:
            msg = f"{type(err).__name__}: {err}"[:2000]
            self.log(f"FAILED {name}: {msg}")
            traceback.print_exc()
            (slot if slot is not None else self.results)[key or name] = {"error": msg}
            self.results["errors"].append({"section": name, "error": msg})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        finally:
            self.save()
            self.log(f"end {name}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_steps(fn: Callable[[], Any], device: str, warmup: int, iters: int) -> float:
    """Seconds per call: CUDA events on the GPU (no host round-trip per step), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def env_info(plan: Plan) -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "plan": plan.__dict__,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count,
        }
    for mod in ("torchvision", "timm", "PIL"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as err:  # absent or broken: recorded, not fatal
            info[mod] = f"unavailable ({type(err).__name__})"
    return info


def nominal_peak(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# --------------------------------------------------------------------------------------------------- 1. matmul
def matmul_tflops(plan: Plan) -> dict[str, Any]:
    n = plan.matmul_n
    dtype = torch.bfloat16
    a = torch.randn(n, n, device=plan.device, dtype=dtype)
    b = torch.randn(n, n, device=plan.device, dtype=dtype)
    seconds = _time_steps(lambda: a @ b, plan.device, warmup=3, iters=10 if plan.device == "cuda" else 2)
    return {"n": n, "dtype": "bf16", "ms": seconds * 1e3, "tflops": 2 * n**3 / seconds / 1e12}


# --------------------------------------------------------------------------------------------------- 2. model
def model_config(plan: Plan, img_size: int):
    from linnaeus.config import load_config
    from linnaeus.config.resolve_model import model_spec

    # Hierarchy-conditioned heads on every rank, as in configs/experiments/generic_mformer_example.yaml.
    heads = "{" + ", ".join(f"{k}: {{TYPE: ConditionalClassifier}}" for k in NUM_CLASSES) + "}"
    opts = [
        "MODEL.CLASSIFICATION.HEADS",
        heads,
        "MODEL.IMG_SIZE",
        str(img_size),
        "DATA.IMG_SIZE",
        str(img_size),
        "DATA.TASK_KEYS_H5",
        json.dumps(list(NUM_CLASSES)),
        "MODEL.DROP_PATH_RATE",
        "0.0",
    ]
    return model_spec(load_config(DEMO if plan.tiny_model else ARCH, opts))


def synthetic_hierarchy() -> dict[tuple[str, str], torch.Tensor]:
    """(parent, child) 0/1 matrices for adjacent ranks: child class c belongs to parent c mod K_parent."""
    keys = sorted(NUM_CLASSES, reverse=True)  # taxa_L30, taxa_L20, taxa_L10: coarse to fine
    out = {}
    for parent, child in itertools.pairwise(keys):
        kp, kc = NUM_CLASSES[parent], NUM_CLASSES[child]
        m = torch.zeros(kp, kc)
        m[torch.arange(kc) % kp, torch.arange(kc)] = 1.0
        out[(parent, child)] = m
    return out


def build_train_model(plan: Plan, img_size: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    from linnaeus.models import build_model, model_size

    cfg = model_config(plan, img_size)
    torch.manual_seed(0)
    model = build_model(cfg, list(NUM_CLASSES), NUM_CLASSES, META_DIMS, synthetic_hierarchy()).to(plan.device)
    model = model.to(memory_format=torch.channels_last).train()
    size = model_size(cfg, META_DIMS, img_size)
    return model, {"name": cfg.name, "params_m": size["params"] / 1e6, "gmacs_fwd": size["gmacs"]}


class TrainStep:
    """One optimizer step from uint8 images: normalise on the device, bf16 autocast, CE over every head, fused
    AdamW. ``model`` returns a dict of logits (ours) or one tensor (a timm reference with one head)."""

    def __init__(self, model: torch.nn.Module, device: str, takes_meta: bool = True) -> None:
        self.model = model
        self.device = device
        self.takes_meta = takes_meta
        fused = device == "cuda"
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, image_u8: torch.Tensor, meta: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        x = ((image_u8.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device, dtype=torch.bfloat16):
            out = self.model(x, meta) if self.takes_meta else self.model(x)
        if isinstance(out, dict):
            loss = sum(F.cross_entropy(out[k].float(), targets[k], ignore_index=-1) for k in out)
        else:
            loss = F.cross_entropy(out.float(), targets["taxa_L10"] % out.shape[1])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def synthetic_batch(
    batch: int, img_size: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    image = torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, generator=g).to(device)
    meta = torch.randn(batch, sum(META_DIMS), generator=g).to(device)
    targets = {k: torch.randint(0, n, (batch,), generator=g).to(device) for k, n in NUM_CLASSES.items()}
    return image, meta, targets


def measure_model(
    model: torch.nn.Module,
    info: dict[str, Any],
    plan: Plan,
    img_size: int,
    batch: int,
    matmul_tflops_measured: float | None,
    peak: float | None,
    takes_meta: bool = True,
) -> dict[str, Any]:
    step = TrainStep(model, plan.device, takes_meta)
    image, meta, targets = synthetic_batch(batch, img_size, plan.device)
    t0 = time.perf_counter()
    step(image, meta, targets)  # first step: compilation (if compiled), cuDNN autotuning, allocator growth
    _sync(plan.device)
    first_s = time.perf_counter() - t0
    seconds = _time_steps(lambda: step(image, meta, targets), plan.device, plan.warmup, plan.iters)
    ips = batch / seconds
    train_flop_per_img = 3 * 2 * info["gmacs_fwd"] * 1e9
    achieved = ips * train_flop_per_img
    res = {
        "img_size": img_size,
        "batch": batch,
        "step_ms": seconds * 1e3,
        "images_per_sec": ips,
        "first_step_s": first_s,
        "train_gflop_per_img": train_flop_per_img / 1e9,
        "achieved_tflops": achieved / 1e12,
    }
    if peak:
        res["mfu_vs_nominal_peak"] = achieved / peak
    if matmul_tflops_measured:
        res["mfu_vs_measured_matmul"] = achieved / (matmul_tflops_measured * 1e12)
    if plan.device == "cuda":
        res["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return res


def run_eager(rec: Recorder, plan: Plan) -> None:
    results = rec.results.setdefault("model", {"eager": {}, "compiled": {}, "reference": {}})
    matmul = rec.results.get("matmul", {}).get("tflops")
    peak = nominal_peak(rec.results.get("env", {}).get("gpu", ""))
    for img_size, batch in plan.sizes.items():
        with rec.section(f"model eager {img_size}px", results["eager"], str(img_size)):
            model, info = build_train_model(plan, img_size)
            res = info | measure_model(model, info, plan, img_size, batch, matmul, peak)
            results["eager"][str(img_size)] = res
            rec.log(
                f"eager {img_size}px: {res['images_per_sec']:.0f} img/s, MFU {res.get('mfu_vs_nominal_peak', 0):.1%}"
            )
            del model
    with rec.section("reference model (timm coatnet_nano_rw_224)", results["reference"], "coatnet_nano_rw_224"):
        results["reference"]["coatnet_nano_rw_224"] = reference_model(plan, matmul, peak)


def run_compiled(rec: Recorder, plan: Plan) -> None:
    """Last, because compile time is the least predictable part: each size starts only with enough budget left."""
    results = rec.results.setdefault("model", {"eager": {}, "compiled": {}, "reference": {}})
    matmul = rec.results.get("matmul", {}).get("tflops")
    peak = nominal_peak(rec.results.get("env", {}).get("gpu", ""))
    for img_size, batch in plan.sizes.items():
        if not plan.compile:
            results["compiled"][str(img_size)] = {
                "skipped": "compile off in --smoke (CPU inductor builds take minutes)"
            }
            continue
        if rec.left() < 110:
            results["compiled"][str(img_size)] = {"skipped": f"time budget ({rec.left():.0f} s left)"}
            rec.results["skipped"].append(f"compiled {img_size}px")
            continue
        with rec.section(f"model compiled {img_size}px", results["compiled"], str(img_size)):
            torch._dynamo.reset()
            model, info = build_train_model(plan, img_size)
            compiled = torch.compile(model, dynamic=False)
            res = info | measure_model(compiled, info, plan, img_size, batch, matmul, peak)
            res["compile_plus_first_step_s"] = res.pop("first_step_s")
            eager = results["eager"].get(str(img_size), {}).get("images_per_sec")
            if eager:
                res["speedup_over_eager"] = res["images_per_sec"] / eager
            results["compiled"][str(img_size)] = res
            rec.log(
                f"compiled {img_size}px: {res['images_per_sec']:.0f} img/s, compile+first step "
                f"{res['compile_plus_first_step_s']:.0f} s"
            )
            del model, compiled


def reference_model(plan: Plan, matmul: float | None, peak: float | None) -> dict[str, Any]:
    try:
        import timm
    except Exception as err:
        return {"unavailable": f"timm not importable ({type(err).__name__})"}
    from torch.utils.flop_counter import FlopCounterMode

    img_size, batch = next(iter(plan.sizes.items()))
    model = timm.create_model(
        "coatnet_nano_rw_224", pretrained=False, num_classes=NUM_CLASSES["taxa_L10"], img_size=img_size
    )
    model = model.to(plan.device).to(memory_format=torch.channels_last).train()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()
        model(torch.randn(1, 3, img_size, img_size, device=plan.device))
        model.train()
    info = {
        "name": "coatnet_nano_rw_224",
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gmacs_fwd": counter.get_total_flops() / 2 / 1e9,
    }
    return info | measure_model(model, info, plan, img_size, batch, matmul, peak, takes_meta=False)


# --------------------------------------------------------------------------------------------------- 3. loader
def write_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int) -> list[str]:
    from benchmarks.common import synth_images

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(synth_images(count, size, seed)):
        p = folder / f"img_{i:06d}.jpg"
        p.write_bytes(data)
        paths.append(str(p))
    return paths


def file_dataset(paths: list[str], img_size: int, train: bool = True):
    """Our FileDataset over plain files with synthetic labels (no labels.h5 needed for a throughput check)."""
    from linnaeus.data.dataset import FileDataset
    from linnaeus.data.samples import SampleTable

    n = len(paths)
    rng = np.random.default_rng(0)
    targets = {k: rng.integers(0, c, n) for k, c in NUM_CLASSES.items()}
    meta = rng.standard_normal((n, sum(META_DIMS))).astype(np.float32)
    table = SampleTable(np.arange(n), targets, meta, np.ones((n, len(META_DIMS)), bool), paths)
    return FileDataset(table, img_size=img_size, train=train)


def plan_loader(ds, plan: Plan):
    """The loader both loader measurements use: the plan's batch and workers, persistent workers, pinned on CUDA."""
    from linnaeus.data.loader import build_loader

    return build_loader(
        ds,
        batch_size=plan.loader_batch,
        num_workers=plan.workers,
        shuffle=True,
        seed=0,
        drop_last=True,
        pin_memory=plan.device == "cuda",
        persistent_workers=True,
    )


def cpu_loader_rate(paths: list[str], plan: Plan, epochs: int = 2) -> dict[str, Any]:
    ds = file_dataset(paths, plan.loader_img)
    loader, sampler = plan_loader(ds, plan)
    rates = []
    for epoch in range(epochs + 1):  # epoch 0 starts the workers and warms the page cache: not counted
        sampler.set_epoch(epoch)
        n, t0 = 0, time.perf_counter()
        for batch in loader:
            batch["image"].to(plan.device, non_blocking=True)
            n += batch["image"].shape[0]
        _sync(plan.device)
        if epoch:
            rates.append(n / (time.perf_counter() - t0))
    ips = float(np.median(rates))
    return {
        "workers": plan.workers,
        "batch": plan.loader_batch,
        "img_size": plan.loader_img,
        "images": len(paths),
        "images_per_sec": ips,
        "images_per_sec_per_worker": ips / max(plan.workers, 1),
        "epochs_timed": epochs,
    }


def gpu_decode_rate(paths: list[str], plan: Plan, epochs: int = 2) -> dict[str, Any]:
    if plan.device != "cuda":
        return {"unavailable": "no CUDA device"}
    try:
        from torchvision.io import decode_jpeg
    except Exception as err:
        return {"unavailable": f"torchvision not importable ({type(err).__name__}: {err})"}
    from linnaeus.data.images import random_resized_crop_box

    size = plan.loader_img

    def batches() -> Iterator[list[str]]:
        for i in range(0, len(paths) - plan.loader_batch + 1, plan.loader_batch):
            yield paths[i : i + plan.loader_batch]

    def one_epoch(resize: bool) -> float:
        n, t0 = 0, time.perf_counter()
        rng = np.random.default_rng(0)
        for group in batches():
            data = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in group]
            images = decode_jpeg(data, device="cuda")
            if resize:
                out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device="cuda")
                for j, im in enumerate(images):
                    h, w = im.shape[-2:]
                    left, top, right, bottom = random_resized_crop_box(w, h, rng)
                    crop = im[:, top:bottom, left:right].unsqueeze(0).float()
                    out[j] = (
                        F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                        .round_()
                        .clamp_(0, 255)[0]
                        .to(torch.uint8)
                    )
            n += len(images)
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)

    one_epoch(True)  # warm-up: nvjpeg handles, kernels, page cache
    decode_only = float(np.median([one_epoch(False) for _ in range(epochs)]))
    full = float(np.median([one_epoch(True) for _ in range(epochs)]))
    return {
        "batch": plan.loader_batch,
        "img_size": size,
        "images": len(paths),
        "decode_only_images_per_sec": decode_only,
        "images_per_sec": full,
        "note": "file read + batched nvJPEG decode + per-image crop/resize on the GPU; one host thread",
    }


def run_loader(rec: Recorder, plan: Plan, tmp: Path) -> dict[str, list[str]]:
    results = rec.results.setdefault("loader", {})
    sets: dict[str, list[str]] = {}
    with rec.section("write JPEGs", results, "data"):
        t0 = time.perf_counter()
        sets["500px"] = write_jpegs(tmp / "500px", plan.images_500, (500, 375), seed=0)
        sets["1MP"] = write_jpegs(tmp / "1MP", plan.images_1mp, (1152, 864), seed=1)
        results["data"] = {k: len(v) for k, v in sets.items()} | {"write_s": time.perf_counter() - t0}
    for label, paths in sets.items():
        slot = results.setdefault(label, {})
        with rec.section(f"CPU loader {label}", slot, "cpu"):
            slot["cpu"] = cpu_loader_rate(paths, plan)
            rec.log(f"CPU loader {label}: {slot['cpu']['images_per_sec']:.0f} img/s")
        with rec.section(f"GPU decode {label}", slot, "gpu_decode"):
            slot["gpu_decode"] = gpu_decode_rate(paths, plan)
        cpu, gpu = slot.get("cpu", {}), slot.get("gpu_decode", {})
        if "images_per_sec" in cpu and "images_per_sec" in gpu:
            slot["gpu_decode_over_cpu_loader"] = gpu["images_per_sec"] / cpu["images_per_sec"]
    return sets


# --------------------------------------------------------------------------------------------------- 4. end to end
def run_end_to_end(rec: Recorder, plan: Plan, paths: list[str]) -> None:

    img_size = plan.loader_img
    model, _ = build_train_model(plan, img_size)
    step = TrainStep(model, plan.device)
    ds = file_dataset(paths, img_size)
    loader, sampler = plan_loader(ds, plan)
    waits, computes = [], []
    done, epoch = 0, 0
    while done < plan.e2e_steps + 2:
        sampler.set_epoch(epoch)
        epoch += 1
        t0 = time.perf_counter()
        for batch in loader:
            t1 = time.perf_counter()
            image = batch["image"].to(plan.device, non_blocking=True)
            meta = batch["meta"].to(plan.device, non_blocking=True)
            targets = {k: v.to(plan.device, non_blocking=True) for k, v in batch["targets"].items()}
            step(image, meta, targets)
            _sync(plan.device)
            t2 = time.perf_counter()
            if done >= 2:  # the first two steps pay for worker start-up and warm-up
                waits.append(t1 - t0)
                computes.append(t2 - t1)
            done += 1
            t0 = time.perf_counter()
            if done >= plan.e2e_steps + 2:
                break
    total = sum(waits) + sum(computes)
    rec.results["end_to_end"] = {
        "model": "eager",
        "img_size": img_size,
        "batch": plan.loader_batch,
        "workers": plan.workers,
        "steps_timed": len(waits),
        "images_per_sec": plan.loader_batch * len(waits) / max(total, 1e-9),
        "data_wait_share": sum(waits) / max(total, 1e-9),
        "compute_ms_median": float(np.median(computes)) * 1e3 if computes else None,
        "wait_ms_median": float(np.median(waits)) * 1e3 if waits else None,
        "data": f"{len(paths)} JPEGs, ≤500 px",
    }


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results path")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, seconds (for tests)")
    p.add_argument("--budget", type=float, default=390.0, help="seconds; a compiled size starts only with 110 s left")
    args = p.parse_args(argv)
    plan = make_plan(args.smoke)
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --smoke for the CPU dry run")
        return 2
    rec = Recorder(args.out, args.budget)
    rec.results["smoke"] = args.smoke
    with rec.section("env"):
        rec.results["env"] = env_info(plan)
        rec.log(f"device: {rec.results['env'].get('gpu', 'cpu')}, torch {torch.__version__}")
    if plan.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    with rec.section("matmul"):
        rec.results["matmul"] = matmul_tflops(plan)
        rec.log(f"bf16 matmul: {rec.results['matmul']['tflops']:.1f} TFLOP/s")
    run_eager(rec, plan)
    with tempfile.TemporaryDirectory(prefix="linnaeus-gpu-bench-") as tmp:
        sets = run_loader(rec, plan, Path(tmp))
        with rec.section("end_to_end"):
            if "500px" not in sets:
                raise RuntimeError("no JPEGs were written (see the loader section's error)")
            run_end_to_end(rec, plan, sets["500px"])
            e2e = rec.results["end_to_end"]
            rec.log(f"end to end: {e2e['images_per_sec']:.0f} img/s, data wait {e2e['data_wait_share']:.0%}")
    run_compiled(rec, plan)
    rec.save()
    rec.log(f"done; results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
