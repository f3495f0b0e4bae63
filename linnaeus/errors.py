"""Errors users see as one line: what is wrong, where, and what was expected."""

from __future__ import annotations

# Exit code of a run that checkpointed on SIGTERM/SIGINT and should be started again (EX_TEMPFAIL: "try again");
# `linnaeus launch`, `linnaeus train` and launch.sh end with it, and launch.sh requeues the job on it.
PREEMPTED_EXIT_CODE = 75


# Longest piece of user data (an identifier, a path built from one) an error line repeats; see ``clip``.
MAX_SHOWN = 200
# A word longer than this in an error line is clipped whatever built the message (a 10 MB identifier must not
# give a 10 MB line).
MAX_WORD = 1000


def clip(value: object, limit: int = MAX_SHOWN) -> str:
    """``value`` as text, its middle replaced by an ellipsis when longer than ``limit`` (its length said)."""
    text = str(value)
    if len(text) <= limit:
        return text
    half = max(1, (limit - 1) // 2)
    return f"{text[:half]}…{text[-half:]} ({len(text)} characters)"


class LinnaeusError(Exception):
    """Base for problems caused by user input. The CLI prints `str(err)` as one line and exits non-zero."""

    exit_code = 2

    def __str__(self) -> str:
        # Guarantee a single line even when a message is assembled from multi-line parts, of readable length.
        text = " ".join(super().__str__().split("\n"))
        if len(text) <= MAX_WORD:
            return text
        return " ".join(clip(word, MAX_SHOWN) if len(word) > MAX_WORD else word for word in text.split(" "))


class ConfigError(LinnaeusError):
    """A configuration key is unknown, has the wrong type, or is inconsistent with another key."""


class DataError(LinnaeusError):
    """labels.h5, taxonomy.json, images or shards do not match what the configuration expects."""
