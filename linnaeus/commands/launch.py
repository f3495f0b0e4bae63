"""``linnaeus launch ARGS...``: ``accelerate launch ARGS...`` whose exit status is 75 when the job was preempted.

Why a wrapper: the exit status of ``accelerate launch`` is decided by accelerate's process, which runs torch elastic's
agent for every multi-process configuration. The agent reports any non-zero rank exit (our 75 included) as a
``ChildFailedError`` and a signal to itself as a ``SignalException``; both leave the launcher with exit 1. Nothing a
rank does can change that, so this command runs accelerate's own launcher in-process and decides the status itself:

- it names a marker file in ``LINNAEUS_PREEMPTED_MARKER`` (inherited by every rank); a rank whose job ended with the
  preemption checkpoint written writes that file (``note_preempted``) before exiting 75;
- if the launch ends with the marker present (or every failed rank exited 75), the command prints one line and
  exits 75; otherwise, when the first rank to fail exited with a status of its own (2: a user error, 3: a
  non-finite stop), the command exits with that status; any other failure propagates unchanged.

Signals: a SIGTERM (SIGINT, SIGHUP; SIGUSR1/2 become a SIGTERM) to this process or its process group reaches torch
elastic's handler, which forwards it to the ranks and waits ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds for them
(default here: 100, inside SLURM's 120 s warning) before killing them; the ranks use that time to agree, checkpoint
and exit 75. A SIGKILL of this process leaves the ranks to notice on their own (``preemption.watch_launcher``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from linnaeus.errors import PREEMPTED_EXIT_CODE, LinnaeusError

MARKER_ENV = "LINNAEUS_PREEMPTED_MARKER"
SHUTDOWN_TIMEOUT_S = 100


def note_preempted(step: int | None = None) -> None:
    """Called by a rank that is about to exit 75 with its checkpoint complete: tells ``linnaeus launch`` so."""
    target = os.environ.get(MARKER_ENV)
    if not target:
        return
    from linnaeus.utils.io import atomic_write_text

    atomic_write_text(Path(target), f"{'' if step is None else step}\n")


def _first_failure(err: BaseException) -> tuple[int, int] | None:
    """(rank, exit status) of the rank that failed first, when it exited with a status of its own (not a signal)."""
    if isinstance(err, subprocess.CalledProcessError):
        return (0, err.returncode) if err.returncode > 0 else None
    first = getattr(err, "get_first_failure", None)
    if not callable(first) or not getattr(err, "failures", None):
        return None
    rank, failure = first()
    code = int(getattr(failure, "exitcode", 1))
    return (int(rank), code) if code > 0 else None


def _exit_codes(err: BaseException) -> list[int]:
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict):
        return [int(getattr(f, "exitcode", 1)) for f in failures.values()]
    if isinstance(err, subprocess.CalledProcessError):
        return [err.returncode]
    return []


def launch_environ(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The launch-related environment accelerate will give each rank of this machine, from its resolved arguments
    (config file and flags), so the ranks' launch checks can run here, before any process is spawned."""
    import copy

    from accelerate.commands.launch import _validate_launch_command

    from linnaeus.engine.launch_checks import DS_CONFIG_ENV

    a, _, _ = _validate_launch_command(copy.deepcopy(args))  # fills the arguments from the config file, no output
    out = dict(environ)
    out["ACCELERATE_MIXED_PRECISION"] = str(a.mixed_precision or "no")
    out["ACCELERATE_USE_CPU"] = str(bool(a.cpu or getattr(a, "use_cpu", False)))
    if a.gpu_ids not in (None, "all"):
        out["CUDA_VISIBLE_DEVICES"] = str(a.gpu_ids)
    if a.use_deepspeed:
        out["ACCELERATE_USE_DEEPSPEED"] = "true"
        if getattr(a, "deepspeed_config_file", None):
            out[DS_CONFIG_ENV] = str(a.deepspeed_config_file)
    out["LOCAL_WORLD_SIZE"] = str(max(1, int(a.num_processes or 1) // max(1, int(a.num_machines or 1))))
    return out


def check_before_spawning(args: argparse.Namespace) -> None:
    """The ranks' launch checks (``check_launch``), run once here: an impossible launch is one line before torch
    elastic spawns anything (it would otherwise add its own notices and a traceback per failed rank)."""
    from linnaeus.engine.launch_checks import check_launch

    check_launch(launch_environ(args, os.environ), announce=False)


def main(argv: Sequence[str] | None = None) -> int:
    from linnaeus.utils import quiet

    quiet.install()
    quiet.settle_deepspeed_accelerator()  # accelerate's DeepSpeed launcher imports deepspeed in this process
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    # torch elastic forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to the ranks; SIGUSR1/SIGUSR2 (`--signal=USR1@120`)
    # would kill the launcher itself. They become a SIGTERM to this process, which the agent forwards.
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
    try:
        check_before_spawning(args)
    except LinnaeusError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    marker_dir = Path(tempfile.mkdtemp(prefix="linnaeus-launch-"))
    marker = marker_dir / "preempted"
    os.environ[MARKER_ENV] = str(marker)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    try:
        try:
            launch_command(args)
        except (Exception, SystemExit) as err:  # ChildFailedError, SignalException, CalledProcessError, sys.exit(1)
            codes = _exit_codes(err)
            if marker.is_file() or (codes and all(c == PREEMPTED_EXIT_CODE for c in codes)):
                print(
                    f"linnaeus launch: the job was preempted and checkpointed; exit {PREEMPTED_EXIT_CODE} "
                    "(rerun the same command to resume)",
                    file=sys.stderr,
                )
                return PREEMPTED_EXIT_CODE
            first = _first_failure(err)
            if first is None:
                raise
            # The rank's own status (2: a user error it printed as one line, 3: a non-finite stop, ...), instead of
            # torch elastic's 1 and its traceback; the rank's error line is above.
            print(f"linnaeus launch: rank {first[0]} exited {first[1]} (its error is above)", file=sys.stderr)
            return first[1]
        return PREEMPTED_EXIT_CODE if marker.is_file() else 0
    finally:
        shutil.rmtree(marker_dir, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    """The `linnaeus launch` handler: ``args.accelerate_args`` is everything after `launch`, for accelerate's parser."""
    return main(args.accelerate_args)
