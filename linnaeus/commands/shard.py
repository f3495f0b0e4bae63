"""``linnaeus shard --cfg EXP.yaml --out DIR [--part I/N | --merge] [...]``: argument handling only; the work is in
``linnaeus.data.shards.writer``."""

from __future__ import annotations

import argparse
import shlex

from linnaeus.data.shards.manifest import MANIFEST_NAME, Part
from linnaeus.data.shards.writer import ShardOptions, merge_parts, write_shards


def original_command(args: argparse.Namespace) -> str:
    """The command as the user would retype it to remake the same shards: no --part/--merge/--workers, which
    change how, not what, is written (so one run and N parts record the same command)."""
    argv = ["linnaeus", "shard", "--cfg", str(args.cfg), "--out", str(args.out)]
    if args.samples_per_shard is not None:
        argv += ["--samples-per-shard", str(args.samples_per_shard)]
    if args.shard_size_mb is not None:
        argv += ["--shard-size-mb", f"{args.shard_size_mb:g}"]
    if args.max_side is not None:
        argv += ["--max-side", str(args.max_side)]
    if str(args.splits) != "train,val":
        argv += ["--splits", str(args.splits)]
    if args.opts:
        argv += ["--opts", *map(str, args.opts)]
    return shlex.join(argv)


def run(args: argparse.Namespace) -> int:
    from linnaeus.config import load_config
    from linnaeus.config.resolve_data import data_spec

    spec = data_spec(load_config(args.cfg, args.opts))
    part = Part.parse(args.part) if getattr(args, "part", None) else None
    options = ShardOptions(
        samples_per_shard=args.samples_per_shard,
        shard_size_mb=args.shard_size_mb,
        workers=args.workers,
        max_side=args.max_side,
        splits=tuple(s.strip() for s in str(args.splits).split(",") if s.strip()),
        cfg_path=str(args.cfg),
        command=original_command(args),
        part=part,
    )
    if getattr(args, "merge", False):
        manifest = merge_parts(spec, args.out, options)
    else:
        manifest = write_shards(spec, args.out, options)
    if part is not None:
        print(
            f"part {part}: {manifest['shards']} of {manifest['planned']} shards ({manifest['written']} written, "
            f"{manifest['kept']} kept, {manifest['stale']} rewritten because their source images changed); "
            f"when every part is done: {options.command} --merge"
        )
        return 0
    for split, entry in manifest["splits"].items():
        skipped = f", {entry['num_skipped']} unreadable images skipped" if entry["num_skipped"] else ""
        print(f"{split}: {entry['num_samples']} samples in {entry['num_shards']} shards{skipped}")
    counts = manifest["_counts"]
    notes = [f"{counts['kept']} shards kept from an earlier run"] if counts["kept"] else []
    if counts["stale"]:
        notes.append(f"{counts['stale']} rewritten because their source images changed")
    print(f"manifest: {args.out}/{MANIFEST_NAME}" + (f" ({'; '.join(notes)})" if notes else ""))
    if not (spec.shards.enabled and spec.shards.dir):
        print(f"train from them with: --opts DATA.SHARDS.ENABLED True DATA.SHARDS.DIR {args.out}")
    return 0
