"""``linnaeus train`` / ``python -m linnaeus.train``: cheap launch checks, load the config, run the trainer."""

from __future__ import annotations

import argparse
import os


def run(args: argparse.Namespace) -> int:
    import sys

    from linnaeus.commands.launch import note_preempted
    from linnaeus.engine.preemption import (
        StoppedDuringSetup,
        install_stop_handlers,
        stop_signal_received,
        watch_launcher,
    )
    from linnaeus.errors import PREEMPTED_EXIT_CODE

    # First: a stop signal during setup exits 75 (the run lock released on the way out), and a rank whose launcher
    # is killed stops as if preempted instead of training on unsupervised.
    install_stop_handlers()
    watch_launcher()
    try:
        code = _train(args)
    except StoppedDuringSetup as stop:
        print(
            f"linnaeus train: received {stop.signal_name} during setup, before any training step; exit "
            f"{PREEMPTED_EXIT_CODE} (nothing new to checkpoint; rerun the same command to continue)",
            file=sys.stderr,
        )
        code = PREEMPTED_EXIT_CODE
    if code == PREEMPTED_EXIT_CODE:
        note_preempted()  # so `linnaeus launch` can report 75 where torch elastic would say "failed"
    elif code == 0 and stop_signal_received():
        print(
            f"linnaeus train: received {stop_signal_received()} after the last step; the run is complete, exit 0",
            file=sys.stderr,
        )
    return code


def _train(args: argparse.Namespace) -> int:
    from linnaeus.engine.launch_checks import check_launch
    from linnaeus.engine.trackers import trackers_preflight

    check_launch()  # before anything is built: one line from the first rank for an impossible launch
    from linnaeus.config import load_config
    from linnaeus.config.resolve_engine import engine_spec
    from linnaeus.engine.trainer import train

    cfg = load_config(args.cfg, args.opts)
    # before any heavy work: a missing tracker package or W&B login is one line, never a prompt
    trackers_preflight(engine_spec(cfg).tracking)
    code = train(cfg)
    if code == 0 and cfg.TRAIN.CALIBRATE and os.environ.get("RANK", "0") == "0":  # one process does it, after all
        from linnaeus.commands.evaluate import calibrate_finished_run

        calibrate_finished_run(cfg.EXPERIMENT.run_folder())
    return code
