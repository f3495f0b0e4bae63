"""``linnaeus bench``: the input pipeline on the user's own data and disk.

Reports loader images/s (total and per worker) and, with the configured model on the available device, the share
of step time spent waiting for data. Numbers are for this machine and this storage; compare settings side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from linnaeus.config import load_config


def _time_loader(loader, batches: int) -> tuple[float, int]:
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    n = 0
    start = time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        n += batch["image"].shape[0]
    return time.perf_counter() - start, n


def run(args: argparse.Namespace) -> int:
    from linnaeus.aug import eval_transform
    from linnaeus.config.resolve_data import data_spec
    from linnaeus.config.resolve_model import model_spec
    from linnaeus.data.loader import build_loader
    from linnaeus.data.prepare import prepare_data
    from linnaeus.models import build_model

    cfg = load_config(args.cfg, args.opts)
    workers = cfg.DATA.NUM_WORKERS if args.workers is None else args.workers
    data = prepare_data(data_spec(cfg))
    dataset = data.dataset("train", train=True)
    loader, sampler = build_loader(
        dataset,
        batch_size=cfg.DATA.BATCH_SIZE,
        num_workers=workers,
        shuffle=True,
        seed=cfg.MISC.SEED,
        drop_last=True,
        prefetch_factor=cfg.DATA.PREFETCH_FACTOR,
        pin_memory=torch.cuda.is_available(),
    )
    sampler.set_epoch(0)
    _say(f"bench: timing the loader, {args.batches} batches of {cfg.DATA.BATCH_SIZE} with {workers} workers ...")
    seconds, images = _time_loader(loader, args.batches)
    loader_ips = images / max(seconds, 1e-9)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hierarchy = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in data.hierarchy_matrices().items()}
    model = build_model(model_spec(cfg), data.task_keys, data.num_classes, data.meta_dims, hierarchy).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _say(
        f"bench: loader {loader_ips:.1f} img/s; timing {args.batches} training steps of {cfg.MODEL.NAME} on {device} ..."
    )
    sampler.set_epoch(1)
    wait = compute = 0.0
    steps = 0
    it = iter(loader)
    t0 = time.perf_counter()
    for i in range(args.batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        images_t = eval_transform(batch["image"].to(device, non_blocking=True), cfg.AUG.MEAN, cfg.AUG.STD)
        meta = batch["meta"].to(device) if batch["meta"].shape[1] else None
        out = model(images_t, meta)
        loss = sum(v.float().logsumexp(dim=1).mean() for v in out.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i > 0:  # the first step includes warm-up on both sides
            wait += t1 - t0
            compute += t2 - t1
            steps += 1
        t0 = t2
    report = {
        "device": str(device),
        "workers": workers,
        "batch_size": cfg.DATA.BATCH_SIZE,
        "img_size": cfg.DATA.IMG_SIZE,
        "loader_images_per_sec": round(loader_ips, 1),
        "loader_images_per_sec_per_worker": round(loader_ips / max(workers, 1), 1),
        "train_steps_timed": steps,
        "data_wait_share": round(wait / max(wait + compute, 1e-9), 4),
    }
    print(json.dumps(report, indent=2) if getattr(args, "json", False) else summary(report))
    return 0


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def summary(report: dict) -> str:
    """The readable form of the bench report (``--json`` prints the raw numbers)."""
    wait = report["data_wait_share"]
    verdict = (
        "the model waits for data: raise DATA.NUM_WORKERS, use shards, or move data to faster storage"
        if wait > 0.2
        else "the input pipeline keeps up with the model"
    )
    return "\n".join(
        [
            f"input pipeline on {report['device']} ({report['workers']} workers, batch {report['batch_size']}, "
            f"{report['img_size']} px)",
            f"  loader            {report['loader_images_per_sec']:.1f} img/s "
            f"({report['loader_images_per_sec_per_worker']:.1f} per worker)",
            f"  data wait         {100 * wait:.1f}% of step time over {report['train_steps_timed']} training steps",
            f"  verdict           {verdict}",
        ]
    )
