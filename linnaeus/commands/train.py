"""``linnaeus train`` / ``python -m linnaeus.train``: load the config, run the trainer."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from linnaeus.config import load_config
    from linnaeus.engine.trainer import train

    return train(load_config(args.cfg, args.opts))
