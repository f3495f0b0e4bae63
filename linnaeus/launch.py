"""``python -m linnaeus.launch ARGS...``: the same as ``linnaeus launch ARGS...`` (see ``linnaeus.commands.launch``)."""

from __future__ import annotations

import sys

from linnaeus.commands.launch import main, note_preempted

__all__ = ["main", "note_preempted"]

if __name__ == "__main__":
    sys.exit(main())
