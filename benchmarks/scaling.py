"""Process scaling and DeepSpeed overhead: real ``accelerate launch`` jobs of the demo experiment on 2 CPU processes.

Variants, each a full ``python -m linnaeus.train`` run under ``accelerate launch`` (gloo, 1 thread per process):

- ``1proc``  accelerate_configs/cpu_ddp.yaml with ``--num_processes 1`` (same launcher, one rank);
- ``ddp``    accelerate_configs/cpu_ddp.yaml (2 ranks, DDP);
- ``zero1``  accelerate_configs/cpu_zero2.yaml with a copy of ds_cpu_zero2.json set to stage 1;
- ``zero2``  accelerate_configs/cpu_zero2.yaml;
- ``zero3``  accelerate_configs/cpu_zero3.yaml.

Throughput is the trainer's own ``images_per_sec`` (all ranks together) from metrics.jsonl, logged every step; the
first rows are warm-up and are dropped, and the remaining per-step rows are the samples. ``measure`` can launch
the variants in several rounds (1proc ddp zero1 ... 1proc ddp ...) so drift spreads over all of them; the suite
uses one round, because each launch spends 10-30 s starting up on 2 cores. Ratios: ddp/1proc (ideal = 2 on 2 cores) and zeroK/ddp
(< 1 means ZeRO costs throughput; for a model this small it can only cost).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, BenchDataset, Comparison, speedup, write_bench_dataset

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
CONFIGS = ROOT / "accelerate_configs"
WARMUP_ROWS = 3  # first logged steps include allocator growth and DeepSpeed's lazy setup
ALL_VARIANTS = ("1proc", "ddp", "zero1", "zero2", "zero3")


def zero1_json(folder: Path) -> Path:
    """ds_cpu_zero2.json with the stage set to 1 (the repo ships no CPU ZeRO-1 file)."""
    ds = json.loads((CONFIGS / "ds_cpu_zero2.json").read_text())
    ds["zero_optimization"]["stage"] = 1
    path = folder / "ds_cpu_zero1.json"
    path.write_text(json.dumps(ds, indent=2))
    return path


def launch_args(variant: str, folder: Path) -> list[str]:
    if variant == "1proc":
        return ["--config_file", str(CONFIGS / "cpu_ddp.yaml"), "--num_processes", "1"]
    if variant == "ddp":
        return ["--config_file", str(CONFIGS / "cpu_ddp.yaml")]
    if variant == "zero1":
        return ["--config_file", str(CONFIGS / "cpu_zero2.yaml"), "--deepspeed_config_file", str(zero1_json(folder))]
    if variant in ("zero2", "zero3"):
        return ["--config_file", str(CONFIGS / f"cpu_{variant}.yaml")]
    raise ValueError(f"unknown scaling variant {variant!r}; expected one of {ALL_VARIANTS}")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # one thread per rank: 2 ranks on 2 cores, and 1proc gets the same per-rank budget
    env["WANDB_MODE"] = "disabled"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_variant(
    variant: str, ds: BenchDataset, out: Path, name: str, steps: int, timeout: int = 600
) -> tuple[list[float], str]:
    """Launch one training job; returns (images/s per logged step after warm-up, the training log's ZeRO line)."""
    opts = ds.opts(
        EXPERIMENT__OUTPUT_DIR=str(out),
        EXPERIMENT__NAME=name,
        DATA__NUM_WORKERS=0,  # 72-px demo JPEGs decode in ~0.2 ms; workers would only steal the ranks' cores
        TRAIN__MAX_STEPS=steps,
        SCHEDULE__METRICS__LOG_INTERVAL_STEPS=1,
        SCHEDULE__VALIDATION__INTERVAL="{STEPS: 1000000}",
        SCHEDULE__VALIDATION__MASK_META_INTERVAL="{STEPS: 1000000}",
        SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 1000000}",
    )
    cmd = [
        ACCELERATE,
        "launch",
        *launch_args(variant, out),
        "-m",
        "linnaeus.train",
        "--cfg",
        str(ROOT / "configs/experiments/demo.yaml"),
        "--opts",
        *opts,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{variant}: launch failed ({proc.returncode}): {' | '.join(tail)}")
    run = out / "linnaeus_demo" / "cpu" / name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ips = [r["images_per_sec"] for r in rows if r.get("phase") == "train" and "images_per_sec" in r]
    log = (run / "logs" / "train.log").read_text()
    zero_line = next((ln.strip() for ln in log.splitlines() if "ZeRO stage" in ln), "")
    return ips[WARMUP_ROWS:], zero_line


def measure(ds: BenchDataset, out: Path, variants: tuple[str, ...], rounds: int, steps: int) -> Comparison:
    samples: dict[str, list[float]] = {v: [] for v in variants}
    zero_lines: dict[str, str] = {}
    errors: list[str] = []
    for r in range(rounds):
        for v in variants:
            try:
                ips, zero_lines[v] = run_variant(v, ds, out, f"{v}_r{r}", steps)
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as err:
                errors.append(str(err).splitlines()[0][:300])
                continue
            samples[v] += [1.0 / x for x in ips if x > 0]  # seconds per image (global), like every other comparison
    ratios: dict[str, float] = {}
    if samples.get("1proc") and samples.get("ddp"):
        s = speedup(samples["ddp"], samples["1proc"])
        ratios["ddp 2 proc / 1 proc (img/s)"] = s
        ratios["scaling efficiency (ddp speedup / 2)"] = s / 2
    for z in ("zero1", "zero2", "zero3"):
        if samples.get(z) and samples.get("ddp"):
            ratios[f"{z}/ddp (img/s)"] = speedup(samples[z], samples["ddp"])
    comp = Comparison(
        name="scaling: accelerate launch on 2 CPU processes (gloo), demo experiment",
        unit="s/img",
        samples=samples,
        ratios=ratios,
        facts={
            "rounds": rounds,
            "steps": steps,
            "warmup_rows_dropped": WARMUP_ROWS,
            "threads_per_rank": 1,
            # As the trainer logged it, to show each launch really ran the stage it claims.
            "zero_stage_logged": {v: line.split()[-1] for v, line in zero_lines.items() if line},
        },
        notes=[f"error: {e}" for e in errors],
    )
    return comp


QUICK_VARIANTS = ("1proc", "ddp", "zero2")  # each launch costs ~20 s of start-up on 2 cores


def run(quick: bool, variants: tuple[str, ...] | None = None) -> list[Comparison]:
    variants = variants or (QUICK_VARIANTS if quick else ALL_VARIANTS)
    with tempfile.TemporaryDirectory(prefix="linnaeus-bench-scaling-") as tmp:
        ds = write_bench_dataset(Path(tmp) / "demo", 360, None)
        # One round: a launch costs 10-30 s of start-up on 2 cores, so the samples are each run's logged steps.
        comp = measure(ds, Path(tmp) / "out", variants, rounds=1, steps=10 if quick else 20)
    if quick:
        comp.notes.append("--quick launches " + ", ".join(variants) + "; the full run adds ZeRO-1 and ZeRO-3")
    return [comp]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import format_comparison

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--variants", default="", help="comma-separated subset of " + ",".join(ALL_VARIANTS))
    args = p.parse_args(argv)
    for comp in run(args.quick, tuple(v for v in args.variants.split(",") if v) or None):
        print(format_comparison(comp), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
