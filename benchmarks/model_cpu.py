"""mFormerV1_sm training-step throughput on CPU vs a reference hybrid conv/attention model of similar GMACs.

    .venv/bin/python -m benchmarks.model_cpu [--quick] [--sizes 64 128] [--batch 8] [--iters 3] [--json OUT]

The reference is a compact CoAtNet-0 / MetaFormer-0-style network (conv stem, MBConv stages, then plain pre-norm
transformer stages; 4.2-4.5 GMACs at 224 like mFormerV1_sm), written here because timm is not a dependency. Both
are timed interleaved at each size and reported as medians; MACs come from ``torch.utils.flop_counter`` on the meta
device (on CPU the fused attention kernel reports no FLOPs). One intra-op thread by default (one DDP rank per core).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import Comparison, format_comparison, interleave, machine_info, median, set_threads
from linnaeus.config import load_config
from linnaeus.config.resolve_model import model_spec
from linnaeus.models import build_model, model_size

ARCH = Path(__file__).resolve().parents[1] / "configs" / "model" / "archs" / "mFormerV1" / "mFormerV1_sm.yaml"
META_DIMS = [2, 3, 10]
TASKS = {"taxa_L10": 1000, "taxa_L20": 300}


# ----------------------------------------------------------------------------------------- reference model
class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.GELU(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.GELU(),
            SqueezeExcite(mid, max(8, cin // 4)),
            nn.Conv2d(mid, cout, 1),
        )
        self.short = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.AvgPool2d(stride), nn.Conv2d(cin, cout, 1))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.short(x) + self.body(x)


class SqueezeExcite(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class ReferenceHybrid(nn.Module):
    """CoAtNet-0-like: stem 64 (/2, /4 after S0), MBConv 96×2 (/4), 192×3 (/8), transformer 384×5 (/16), 768×2 (/32)."""

    def __init__(self, num_classes: dict[str, int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.GELU(), nn.Conv2d(64, 64, 3, 1, 1))
        self.s1 = nn.Sequential(MBConv(64, 96, 2), MBConv(96, 96, 1))
        self.s2 = nn.Sequential(MBConv(96, 192, 2), *(MBConv(192, 192, 1) for _ in range(2)))
        self.down3, self.s3 = nn.Conv2d(192, 384, 2, 2), nn.Sequential(*(Block(384, 12) for _ in range(5)))
        self.down4, self.s4 = nn.Conv2d(384, 768, 2, 2), nn.Sequential(*(Block(768, 24) for _ in range(2)))
        self.norm = nn.LayerNorm(768)
        self.heads = nn.ModuleDict({k: nn.Linear(768, n) for k, n in num_classes.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.s2(self.s1(self.stem(x)))
        x = self.down3(x)
        b, c, h, w = x.shape
        x = self.s3(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        x = self.s4(self.down4(x).flatten(2).transpose(1, 2))
        return self.norm(x.mean(1))

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


def reference_gmacs(size: int) -> float:
    with torch.device("meta"):
        model = ReferenceHybrid({})
        image = torch.empty(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.features(image)
    return counter.get_total_flops() / 2 / 1e9


# ----------------------------------------------------------------------------------------- timing
def make_step(model: nn.Module, batch: int, size: int):
    image, meta = torch.randn(batch, 3, size, size), torch.randn(batch, sum(META_DIMS))
    targets = {k: torch.randint(0, n, (batch,)) for k, n in TASKS.items()}

    def step() -> None:
        out = model(image, meta)
        loss = sum(F.cross_entropy(out[k], targets[k]) for k in TASKS)
        model.zero_grad(set_to_none=True)
        loss.backward()

    return step


def bench(sizes: list[int], batch: int, iters: int) -> list[Comparison]:
    torch.manual_seed(0)
    cfg = model_spec(load_config(ARCH))
    ours = build_model(cfg, list(TASKS), TASKS, META_DIMS).train()
    ref = ReferenceHybrid(TASKS).train()
    comps = []
    for size in sizes:
        samples = interleave(
            {"mFormerV1_sm": make_step(ours, batch, size), "reference_hybrid": make_step(ref, batch, size)},
            reps=iters,
            warmup=1,
        )
        per_img = {k: [s / batch for s in v] for k, v in samples.items()}
        ours_macs, ref_macs = model_size(cfg, META_DIMS, size)["gmacs"], reference_gmacs(size)
        ratio = median(per_img["reference_hybrid"]) / median(per_img["mFormerV1_sm"])
        comps.append(
            Comparison(
                name=f"model forward+backward, {size} px, batch {batch}",
                unit="s/img",
                samples=per_img,
                ratios={
                    "mFormerV1_sm img/s vs reference": ratio,
                    "per GMAC (ours vs reference)": ratio * ours_macs / ref_macs,
                },
                facts={
                    "mFormerV1_sm GMACs/img": round(ours_macs, 3),
                    "reference GMACs/img": round(ref_macs, 3),
                    "mFormerV1_sm params (M)": round(sum(p.numel() for p in ours.parameters()) / 1e6, 2),
                    "reference params (M)": round(sum(p.numel() for p in ref.parameters()) / 1e6, 2),
                    "threads": torch.get_num_threads(),
                },
                notes=["mFormerV1_sm carries 3 metadata tokens and 4.5 M metadata-embedder parameters"],
            )
        )
    return comps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 px only, 2 timed steps")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads; 0 keeps torch's default")
    parser.add_argument("--json", default=None, help="write the comparisons here")
    args = parser.parse_args(argv)
    if args.threads > 0:
        set_threads(args.threads)
    sizes, iters = ([64], 2) if args.quick else (args.sizes, args.iters)
    comps = bench(sizes, args.batch, iters)
    for comp in comps:
        print(format_comparison(comp), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(), "comparisons": [c.to_dict() for c in comps]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
