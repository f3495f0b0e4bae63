"""``linnaeus shard --cfg EXP.yaml --out DIR [...]``: argument handling only; the work is in ``writer``."""

from __future__ import annotations

import argparse

from linnaeus.data.shards.manifest import MANIFEST_NAME
from linnaeus.data.shards.writer import ShardOptions, write_shards


def run(args: argparse.Namespace) -> int:
    from linnaeus.config import load_config

    cfg = load_config(args.cfg, args.opts)
    options = ShardOptions(
        samples_per_shard=args.samples_per_shard,
        shard_size_mb=args.shard_size_mb,
        workers=args.workers,
        max_side=args.max_side,
        splits=tuple(s.strip() for s in str(args.splits).split(",") if s.strip()),
        cfg_path=str(args.cfg),
    )
    manifest = write_shards(cfg, args.out, options)
    for split, entry in manifest["splits"].items():
        skipped = f", {entry['num_skipped']} unreadable images skipped" if entry["num_skipped"] else ""
        print(f"{split}: {entry['num_samples']} samples in {entry['num_shards']} shards{skipped}")
    kept = manifest.get("_kept", 0)
    print(f"manifest: {args.out}/{MANIFEST_NAME}" + (f" ({kept} shards kept from an earlier run)" if kept else ""))
    if not (cfg.DATA.SHARDS.ENABLED and cfg.DATA.SHARDS.DIR):
        print(f"train from them with: --opts DATA.SHARDS.ENABLED True DATA.SHARDS.DIR {args.out}")
    return 0
