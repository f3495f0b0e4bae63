"""The ``linnaeus`` console script: parses arguments, then calls one function per command.

Each command's work lives in its own module under ``linnaeus.commands``; this file only knows their names and
arguments, imports the chosen handler (so ``linnaeus --help`` stays fast), and turns a
``LinnaeusError`` into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from linnaeus.errors import LinnaeusError

# command -> "module:function"; the function takes the parsed argparse.Namespace and returns an exit code.
HANDLERS: dict[str, str] = {
    "train": "linnaeus.commands.train:run",
    "launch": "linnaeus.commands.launch:run",
    "shard": "linnaeus.commands.shard:run",
    "check": "linnaeus.commands.check:run",
    "predict": "linnaeus.commands.inference:run_predict",
    "export": "linnaeus.commands.inference:run_export",
    "calibrate": "linnaeus.commands.evaluate:run_calibrate",
    "evaluate": "linnaeus.commands.evaluate:run_evaluate",
    "demo-data": "linnaeus.commands.demo_data:run",
    "bench": "linnaeus.commands.bench:run",
    "plot": "linnaeus.commands.plot:run",
    "config": "linnaeus.commands.config:run",
    "env": "linnaeus.commands.env:run",
}


COST_PROFILES = ("v0_conservative", "v0_balanced", "v0_aggressive")


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--policy",
        default=None,
        choices=["repair", "threshold", "climb", "cost"],
        help="decision policy (default: the model's stored default, else repair); threshold/climb need "
        "`linnaeus calibrate`",
    )
    p.add_argument("--cost-profile", default=None, choices=list(COST_PROFILES), help="with --policy cost")
    p.add_argument(
        "--no-calibration", action="store_true", help="raw softmax scores even when the model has temperatures"
    )


def add_cfg_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--cfg", required=required, help="experiment YAML (BASE files are followed)")
    p.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="override config keys: --opts DATA.BATCH_SIZE 32 TRAIN.EPOCHS 5 (values are parsed as YAML)",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("linnaeus")
    except PackageNotFoundError:  # a source checkout that was never installed
        from linnaeus import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linnaeus",
        description="Hierarchical taxonomic image classification: train, shard, check, predict, export, calibrate, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a model (same as `python -m linnaeus.train`)")
    add_cfg_arguments(p)

    # Parsed by accelerate's own parser (see main); listed here for --help.
    sub.add_parser(
        "launch",
        help="`accelerate launch` with the same arguments, exiting 75 when the job was preempted and checkpointed",
        add_help=False,
    )

    p = sub.add_parser("shard", help="write WebDataset tar shards from labels.h5 + images")
    add_cfg_arguments(p)
    p.add_argument("--out", required=True, help="output folder, e.g. shards/my_dataset")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--shard-size-mb",
        "--shard-size",
        type=float,
        dest="shard_size_mb",
        default=None,
        help="target shard size in MB (default 256)",
    )
    size.add_argument("--samples-per-shard", type=int, default=None, help="fixed number of samples per shard")
    p.add_argument("--workers", type=int, default=None, help="parallel writer processes (default: CPU count, max 8)")
    p.add_argument("--max-side", type=int, default=None, help="re-encode images whose longer side exceeds PX")
    p.add_argument("--splits", default="train,val", help="which splits to write (default train,val)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--part", default=None, metavar="I/N", help="write only part I of N (parallel jobs); no manifest")
    mode.add_argument("--merge", action="store_true", help="after all --part jobs: verify them, write the manifest")

    p = sub.add_parser("check", help="validate config, labels.h5, taxonomy and images; print a report")
    add_cfg_arguments(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-images", action="store_true", help="skip the image existence check")
    p.add_argument("--decode-images", action="store_true", help="also decode every image to find corrupt files")

    p = sub.add_parser("predict", help="hierarchy-consistent predictions as polli-typus JSON lines")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="folder written by `linnaeus export`")
    src.add_argument("--run", help="a run folder (its best, else final, weights)")
    p.add_argument("images", nargs="*", help="image files or folders")
    p.add_argument(
        "--manifest",
        default=None,
        help="CSV or JSONL, one image per row: image (or path) plus optional latitude, longitude, date, elevation",
    )
    p.add_argument(
        "--observations",
        default=None,
        metavar="FILE",
        help="JSON lines, one observation each (id, images, optional metadata): one answer per observation",
    )
    p.add_argument("--lat", type=float, default=None, help="latitude in degrees")
    p.add_argument("--lon", type=float, default=None, help="longitude in degrees")
    p.add_argument("--date", default=None, help="ISO 8601 observation date, e.g. 2024-06-01")
    p.add_argument("--elevation", type=float, default=None, help="elevation in metres")
    p.add_argument("--top-k", type=int, default=5, help="candidates listed per rank, highest score first (default 5)")
    p.add_argument(
        "--format",
        choices=["json", "table"],
        default="json",
        help="json: one polli-typus JSON line per image (default); table: a readable block per image",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--raw", action="store_true", help="per-rank top-k without hierarchy-consistent decoding")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add_policy_arguments(p)

    p = sub.add_parser("export", help="write a self-contained inference bundle from a run")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument(
        "--which",
        default="best",
        help="best | final | ema | step_N (default best, falling back to final; ema: TRAIN.EMA weights)",
    )
    p.add_argument(
        "--assume-encodings",
        action="store_true",
        help="export even when a metadata component's columns are unknown (no COLUMNS, no column_names): use the "
        "built-in encoding, warn, and record the assumption in bundle.json",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="also fit the temperatures and the threshold/climb policies on the run's validation split "
        "(as `linnaeus calibrate`) and store them in the bundle",
    )
    p.add_argument("--target-accuracy", type=float, default=0.95, help="with --calibrate (default 0.95)")
    p.add_argument(
        "--default-policy",
        default="repair",
        choices=["repair", "threshold", "climb", "cost"],
        help="with --calibrate: the policy the bundle answers with by default",
    )

    for name, text in (
        ("calibrate", "fit per-rank temperatures and the threshold/climb policies on a labelled split"),
        ("evaluate", "metrics.json, report.html and plots of a model on a labelled test set or the val split"),
    ):
        p = sub.add_parser(name, help=text)
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--bundle", help="folder written by `linnaeus export`")
        src.add_argument("--run", help="a run folder")
        p.add_argument("--which", default="best", help="with --run: best | final | ema | step_N (default best)")
        p.add_argument("--split", default=None, help="val: the run's saved validation split (default)")
        p.add_argument("--labels", default=None, help="a labels file in the labels.h5 schema (e.g. test.h5)")
        p.add_argument("--images", default=None, help="the image folder of --labels")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--workers", type=int, default=0, help="image loader worker processes (default 0)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        if name == "calibrate":
            p.add_argument(
                "--target-accuracy",
                type=float,
                default=0.95,
                help="accuracy of committed answers the threshold and climb policies are fitted for (default 0.95)",
            )
            p.add_argument(
                "--default-policy",
                default="repair",
                choices=["repair", "threshold", "climb", "cost"],
                help="the policy predict/evaluate use when none is given (stored with the weights)",
            )
            p.add_argument("--cost-profile", default=None, choices=list(COST_PROFILES))
        else:
            p.add_argument(
                "--out",
                default=None,
                help="folder for metrics.json, report.html, plots/ (default: metrics as JSON on stdout)",
            )
            p.add_argument("--metadata", default="on", choices=["on", "masked", "both"])
            p.add_argument("--save-predictions", action="store_true", help="also write predictions.jsonl (typus)")
            add_policy_arguments(p)

    p = sub.add_parser("demo-data", help="write the synthetic demo dataset (images, labels.h5, taxonomy.json)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-species", type=int, default=200, help="images per species (12 species)")
    p.add_argument(
        "--observations", action="store_true", help="group each species' images into observations of 2-4 photos"
    )
    p.add_argument(
        "--views",
        default="distinct",
        help="with --observations, how an observation's photos differ: distinct | near-duplicate (burst shots) |"
        " detail-in-one (the species shows in one photo only)",
    )

    p = sub.add_parser("bench", help="measure the input pipeline on your own data and disk")
    add_cfg_arguments(p)
    p.add_argument("--batches", type=int, default=50, help="batches to time")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: DATA.NUM_WORKERS)")
    p.add_argument("--json", action="store_true", help="print the raw numbers as JSON instead of the summary")

    p = sub.add_parser("plot", help="draw a run's plots and report (plots/, report.html), also while it runs")
    p.add_argument("--run", required=True, help="run folder")

    p = sub.add_parser("env", help="versions, devices, DeepSpeed ops and trackers, for bug reports")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("config", help="render, validate, explain or migrate a config (Polli Linnaeus configs too)")
    cs = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    q = cs.add_parser("render", help="the resolved config, each value with the file it came from")
    add_cfg_arguments(q)
    q.add_argument("--json", action="store_true", help="{key: {value, source}} as JSON")
    q = cs.add_parser("validate", help="list every config problem at once (and the compatibility warnings)")
    add_cfg_arguments(q)
    q.add_argument("--json", action="store_true", help="print {ok, errors, warnings} as JSON")
    q.add_argument(
        "--accelerate-config",
        default=None,
        metavar="FILE",
        help="the accelerate config you will launch with: also check what it makes impossible (e.g. ZeRO-3 + GradNorm)",
    )
    q.add_argument("--verbose", action="store_true", help="one warning per prior-system key instead of a summary")
    q = cs.add_parser("explain", help="what a key means, its default, and where it is set")
    q.add_argument("key", help="dotted key, e.g. DATA.BATCH_SIZE (Polli Linnaeus keys too)")
    add_cfg_arguments(q, required=False)
    q = cs.add_parser("migrate", help="rewrite a (Polli Linnaeus) config in our keys, one comment per change")
    q.add_argument("file", help="the YAML to migrate (its BASE files are inlined)")
    q.add_argument("--out", default=None, help="output file (default: FILE with .migrated.yaml)")
    return parser


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:
        # Everything after `launch` belongs to accelerate's parser (options such as --config_file included).
        return _resolve(HANDLERS["launch"])(argparse.Namespace(command="launch", accelerate_args=argv[1:]))
    args = build_parser().parse_args(argv)
    from linnaeus.utils import quiet

    quiet.install()
    if args.command in (
        "train",
        "predict",
        "export",
        "calibrate",
        "evaluate",
    ):  # the commands that may import DeepSpeed
        quiet.settle_deepspeed_accelerator()
    handler = _resolve(HANDLERS[args.command])
    try:
        return int(handler(args) or 0)
    except LinnaeusError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def run() -> NoReturn:
    """The ``linnaeus`` console script and ``python -m linnaeus``: :func:`main`, then the process ends without the
    interpreter's module teardown (``linnaeus.utils.exit``: 1-2 s once torch is loaded). In-process callers (tests,
    notebooks) call :func:`main`, which returns."""
    from linnaeus.utils.exit import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
