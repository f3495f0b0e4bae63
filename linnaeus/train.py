"""``python -m linnaeus.train --cfg EXP.yaml [--opts KEY VALUE ...]``: the main job, under any launcher.

A thin entry point for launchers that take a module (``accelerate launch -m``); the work is in
``linnaeus.commands.train``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from collections.abc import Sequence

from linnaeus.commands.train import run
from linnaeus.errors import LinnaeusError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from linnaeus.cli import add_cfg_arguments

    parser = argparse.ArgumentParser(
        prog="python -m linnaeus.train",
        description="Train a Linnaeus model. Launch with `accelerate launch [--config_file ...] -m linnaeus.train`.",
    )
    add_cfg_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A script calling main() at top level (no `if __name__ == "__main__":`) runs again in every DataLoader
        # worker as it starts (forkserver/spawn re-run the main script); that copy must not train.
        script = getattr(sys.modules.get("__mp_main__"), "__file__", "the script")
        print(
            f"error: {script} calls linnaeus.train.main() at import; DataLoader workers import that script, so "
            'put the call under `if __name__ == "__main__":`',
            file=sys.stderr,
        )
        raise SystemExit(2)
    args = parse_args(argv)
    from linnaeus.utils import quiet

    quiet.install()
    try:
        return run(args)
    except LinnaeusError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    from linnaeus.utils.exit import exit_process

    exit_process(main())  # skips the 1-2 s module teardown of torch/timm/DeepSpeed in every rank
