"""``linnaeus train`` / ``python -m linnaeus.train``: cheap launch checks, load the config, run the trainer."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from linnaeus.engine.launch_checks import check_launch
    from linnaeus.engine.trackers import wandb_preflight

    check_launch()  # before anything is built: one line from the first rank for an impossible launch
    from linnaeus.commands.launch import note_preempted
    from linnaeus.config import load_config
    from linnaeus.config.resolve_engine import engine_spec
    from linnaeus.engine.trainer import PREEMPTED_EXIT_CODE, train

    cfg = load_config(args.cfg, args.opts)
    wandb_preflight(engine_spec(cfg).tracking)  # before any heavy work: a missing W&B login is one line, never a prompt
    code = train(cfg)
    if code == PREEMPTED_EXIT_CODE:
        note_preempted()  # so `linnaeus launch` can report 75 where torch elastic would say "failed"
    return code
