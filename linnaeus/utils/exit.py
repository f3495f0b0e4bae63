"""Ending a command-line process without the interpreter's module teardown."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """End this process with exit status ``code`` as ``sys.exit(code)`` would, minus Python's final teardown.

    At shutdown Python clears every imported module one by one; with torch, timm and DeepSpeed loaded that takes
    1-2 s per process (every rank of every run, every ``python -m linnaeus`` command) after all the work is done.
    What a normal exit does that has an effect still happens, in the same order: non-daemon threads are joined,
    the ``atexit`` handlers run (log handlers flushed and closed, the run lock released, loader workers ended,
    trackers finished), the standard streams are flushed. Only for ``__main__`` blocks: never call it from code
    that a test or another program runs in-process."""
    main = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say to it, as at a normal exit
            pass
    os._exit(code)
