"""mFormerV1_sm training-step throughput on CPU: forward + backward images/s at a few input sizes.

    .venv/bin/python -m benchmarks.model_cpu [--sizes 64 128] [--batch 8] [--iters 3] [--threads 1]

The sizes are timed interleaved (64 128 64 128 ...) and reported as medians, so machine load drifts over all of
them alike. One intra-op thread by default (one DDP rank per core); on a loaded 2-core machine, 2 threads can be
10x slower than 1 because they wait on each other. "GMAC/s" counts a training step as 3x the forward MACs
(forward, input gradients, weight gradients).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import interleave, median, set_threads
from linnaeus.config import load_config
from linnaeus.models import build_model, model_size

ARCH = Path(__file__).resolve().parents[1] / "configs" / "model" / "archs" / "mFormerV1" / "mFormerV1_sm.yaml"
META_DIMS = [2, 3, 10]
TASKS = {"taxa_L10": 1000, "taxa_L20": 300}


def make_step(model: torch.nn.Module, batch: int, size: int):
    image, meta = torch.randn(batch, 3, size, size), torch.randn(batch, sum(META_DIMS))
    targets = {k: torch.randint(0, n, (batch,)) for k, n in TASKS.items()}

    def step() -> None:
        out = model(image, meta)
        loss = sum(torch.nn.functional.cross_entropy(out[k], targets[k]) for k in TASKS)
        model.zero_grad(set_to_none=True)
        loss.backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads; 0 keeps torch's default")
    args = parser.parse_args()
    if args.threads > 0:
        set_threads(args.threads)

    torch.manual_seed(0)
    cfg = load_config(ARCH).MODEL
    model = build_model(cfg, list(TASKS), TASKS, META_DIMS).train()
    params = sum(p.numel() for p in model.parameters())
    print(
        f"mFormerV1_sm: {params / 1e6:.1f} M params with 2 heads; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, batch {args.batch}, {args.iters} timed steps per size"
    )
    steps = {f"{s}px": make_step(model, args.batch, s) for s in args.sizes}
    samples = interleave(steps, reps=args.iters, warmup=1)
    print(f"{'size':>6} {'GMACs/img':>10} {'median s':>9} {'img/s':>8} {'GMAC/s':>8}")
    for size in args.sizes:
        gmacs = model_size(cfg, META_DIMS, size)["gmacs"]
        seconds = median(samples[f"{size}px"])
        print(
            f"{size:>6} {gmacs:>10.2f} {seconds:>9.3f} {args.batch / seconds:>8.1f} {3 * gmacs * args.batch / seconds:>8.1f}"
        )


if __name__ == "__main__":
    main()
