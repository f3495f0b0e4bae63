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
    from linnaeus.config import load_config
    from linnaeus.engine.trainer import PREEMPTED_EXIT_CODE, train
    from linnaeus.launch import note_preempted

    cfg = load_config(args.cfg, args.opts)
    code = train(cfg)
    if code == PREEMPTED_EXIT_CODE:
        note_preempted()  # so `linnaeus launch` can report 75 where torch elastic would say "failed"
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_from_args(args)
    except LinnaeusError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
