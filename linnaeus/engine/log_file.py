"""The run's log files, written so that a full disk costs the log file, never a traceback on the console.

``logging.FileHandler`` reports a failed write by printing "--- Logging error ---" and a traceback to stderr for
every record (``Handler.handleError``); when the disk fills between checkpoints that buries the one line that says
what happened. Here a failed write says so once, in one line, and later records go to the console only.
"""

from __future__ import annotations

import logging
import sys


class RunLogFile(logging.FileHandler):
    """A ``FileHandler`` that, once a write fails, warns once (one line on stderr) and stops writing."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def flush(self) -> None:
        if not self.failed:
            super().flush()

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the buffered tail of a write that already failed: said once, in handleError
            if not self.failed:
                raise

    def handleError(self, record: logging.LogRecord) -> None:  # logging's own name for this hook
        if self.failed:
            return
        self.failed = True
        err = sys.exc_info()[1]
        reason = (getattr(err, "strerror", None) or type(err).__name__) if err is not None else "unknown error"
        print(
            f"warning: cannot write to {self.baseFilename} ({reason}); records from here on are shown on the console only",
            file=sys.stderr,
        )
