"""``linnaeus plot --run RUN``: draw the run's PNG plots and rewrite its report, for any run, even one still going."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from linnaeus.errors import ConfigError


def run(args: argparse.Namespace) -> int:
    from linnaeus.engine.report import METRICS_FILE, write_report

    run_dir = Path(args.run)
    if not (run_dir / METRICS_FILE).is_file():
        raise ConfigError(f"--run: {run_dir} has no {METRICS_FILE} (expected a run folder written by `linnaeus train`)")
    summary = write_report(run_dir)
    print(summary)
    print(f"plots: {run_dir / 'plots'}", file=sys.stderr)
    return 0
