"""``python -m linnaeus.train --cfg EXP.yaml [--opts KEY VALUE ...]``: the main job, under any launcher."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from linnaeus.errors import LinnaeusError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from linnaeus.cli import add_cfg_arguments

    parser = argparse.ArgumentParser(
        prog="python -m linnaeus.train",
        description="Train a Linnaeus model. Launch with `accelerate launch [--config_file ...] -m linnaeus.train`.",
    )
    add_cfg_arguments(parser)
    return parser.parse_args(argv)


def run_from_args(args: argparse.Namespace) -> int:
    from linnaeus.engine.launch_checks import check_launch
    from linnaeus.engine.trackers import wandb_preflight

    check_launch()  # before anything is built: one line from the first rank for an impossible launch
    from linnaeus.config import load_config
    from linnaeus.engine.trainer import train

    cfg = load_config(args.cfg, args.opts)
    wandb_preflight(cfg)  # before any heavy work: a missing W&B login is one line, never a prompt
    return train(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from linnaeus.utils import quiet

    quiet.install()
    try:
        return run_from_args(args)
    except LinnaeusError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
