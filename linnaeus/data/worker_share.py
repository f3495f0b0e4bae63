"""Datasets hand their NumPy columns to loader workers through shared memory instead of by copy.

Loader workers start from a forkserver (``loader.worker_context``) and receive their dataset pickled. By value, each
worker of each process would hold its own copy of the sample table: about 200 MB per million image rows, so 64
workers on a node at ten million rows would need 128 GB. Instead, while multiprocessing pickles a dataset for a new
process, each large array travels as a shared-memory tensor (a file descriptor, through torch's own multiprocessing
reduction) and the worker rebuilds it as a NumPy view of the same pages. The first hand-off moves the array into
shared memory in this process too, so the originals are freed and later epochs send the same pages again.

Ordinary pickling (copies, saving) is unchanged. Where ``/dev/shm`` lacks the room (containers default to 64 MB),
arrays go by value, with one warning.
"""

from __future__ import annotations

import logging
import shutil
from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["MIN_SHARED_BYTES", "ArraysToWorkers", "shm_free_bytes"]

MIN_SHARED_BYTES = 1 << 20  # smaller arrays are cheaper to copy than to map
_SHM = "/dev/shm"
_warned_no_room = False


class ArraysToWorkers:
    """Mixin: the NumPy arrays in ``self.__dict__`` (also as values of dicts there) reach new worker processes as
    shared memory; see the module docstring."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if get_spawning_popen() is None:  # not a process start: plain pickling, by value
            return state
        for name, value in state.items():
            if isinstance(value, np.ndarray):
                state[name], self.__dict__[name] = _handoff(value)
            elif isinstance(value, dict) and any(isinstance(v, np.ndarray) for v in value.values()):
                pairs = {k: _handoff(v) if isinstance(v, np.ndarray) else (v, v) for k, v in value.items()}
                state[name] = {k: sent for k, (sent, _) in pairs.items()}
                value.update({k: kept for k, (_, kept) in pairs.items()})
        return state


def _handoff(array: np.ndarray) -> tuple[Any, np.ndarray]:
    """(what to pickle for ``array``, what to keep here in its place): a ``_Shared`` and the shared view, or the
    array itself twice when it is small, of a type torch cannot hold, or there is no room."""
    tensor = _shared_tensor_of(array)
    if tensor is None:
        tensor = _to_shared_memory(array)
        if tensor is None:
            return array, array
        array = tensor.numpy()
    return _Shared(tensor), array


class _Shared:
    """Pickles as ``tensor`` (shared by file descriptor) and unpickles as the NumPy view of it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __reduce__(self) -> tuple[Any, tuple[torch.Tensor]]:
        return _as_array, (self.tensor,)


def _as_array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.numpy()  # the view keeps the tensor, and so the mapping, alive


def _shared_tensor_of(array: np.ndarray) -> torch.Tensor | None:
    """The shared tensor ``array`` is the whole view of (a column already handed off), else None."""
    base = array.base
    if isinstance(base, torch.Tensor) and base.is_shared() and base.data_ptr() == array.ctypes.data:
        if tuple(base.shape) == array.shape and base.is_contiguous() and array.flags.c_contiguous:
            return base
    return None


def _to_shared_memory(array: np.ndarray) -> torch.Tensor | None:
    global _warned_no_room
    if array.nbytes < MIN_SHARED_BYTES or not array.flags.c_contiguous:
        return None
    try:
        tensor = torch.from_numpy(array)
    except TypeError:  # a dtype torch has no tensor type for
        return None
    free = shm_free_bytes()
    if free is not None and free < 2 * array.nbytes:  # leave room for the batches the workers send back
        if not _warned_no_room:
            _warned_no_room = True
            log.warning(
                "%s has %.0f MB free: dataset columns go to each loader worker by copy (raise the container's "
                "--shm-size to share them)",
                _SHM,
                free / 2**20,
            )
        return None
    return torch.empty_like(tensor).share_memory_().copy_(tensor)


def shm_free_bytes() -> int | None:
    """Free bytes of the shared-memory file system (None where there is none to ask)."""
    try:
        return shutil.disk_usage(_SHM).free
    except OSError:
        return None
