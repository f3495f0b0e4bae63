"""One writer per shard folder: a full ``linnaeus shard`` run or ``--merge`` has the ``--out`` folder to itself;
``--part`` runs share it (array tasks write their own shards side by side) but each part runs once.

Advisory ``flock`` locks: on the folder itself (shared for a part, exclusive otherwise) and on the part's own
progress log. The kernel drops them when the holder exits, however it exits, so a killed run never leaves a lock to
clean up, and the folder holds no extra file. Two runs that would interleave their temporary files, progress logs
and manifest get one line instead of a traceback.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from linnaeus.data.shards.manifest import Part, progress_path
from linnaeus.errors import DataError


class ShardFolderLock:
    """Context manager: exclusive for a full run or merge (``part=None``), shared plus the part's own for a part."""

    def __init__(self, out: Path, part: Part | None) -> None:
        self.out = Path(out)
        self.part = part
        self._fds: list[int] = []

    def __enter__(self) -> ShardFolderLock:
        try:
            busy = "another `linnaeus shard` run (a full run, a merge or a --part) is writing into it"
            self._take(os.open(self.out, os.O_RDONLY), fcntl.LOCK_SH if self.part else fcntl.LOCK_EX, busy)
            if self.part is not None:
                fd = os.open(progress_path(self.out, self.part), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._take(fd, fcntl.LOCK_EX, f"part {self.part} is already being written by another run")
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self._release()

    def _take(self, fd: int, mode: int, busy: str) -> None:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataError(
                f"--out {self.out}: {busy}; wait for it to finish or choose another --out "
                "(the parts of one plan may run side by side, each once)"
            ) from None
        self._fds.append(fd)

    def _release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())  # closing drops the flock
