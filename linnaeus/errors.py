"""Errors users see as one line: what is wrong, where, and what was expected."""

from __future__ import annotations

# Exit code of a run that checkpointed on SIGTERM/SIGINT and should be started again (EX_TEMPFAIL: "try again");
# `linnaeus launch`, `linnaeus train` and launch.sh end with it, and launch.sh requeues the job on it.
PREEMPTED_EXIT_CODE = 75


class LinnaeusError(Exception):
    """Base for problems caused by user input. The CLI prints `str(err)` as one line and exits non-zero."""

    exit_code = 2

    def __str__(self) -> str:
        # Guarantee a single line even when a message is assembled from multi-line parts.
        return " ".join(super().__str__().split("\n"))


class ConfigError(LinnaeusError):
    """A configuration key is unknown, has the wrong type, or is inconsistent with another key."""


class DataError(LinnaeusError):
    """labels.h5, taxonomy.json, images or shards do not match what the configuration expects."""
