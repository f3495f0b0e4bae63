"""Loading the pickled files of a run folder without running code from them.

Checkpoint folders hold ``torch.save`` pickles written by DeepSpeed and accelerate (ZeRO model/optimizer shards, RNG
states). A pickle can call any importable function, so a crafted file would run code the moment it is unpickled.
Everything here loads with ``weights_only=True``: tensors, plain containers and an exact list of names these
libraries are known to write. DeepSpeed's few classes are rebuilt as inert stand-ins (``Opaque``), so reading a
checkpoint needs no DeepSpeed import and no class of theirs runs.

``verify_checkpoint_files`` scans every pickle in a folder *without loading it* and refuses any name outside that
list; resume calls it before DeepSpeed/accelerate (which unpickle with ``weights_only=False``) touch the folder.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from linnaeus.errors import DataError

# Names DeepSpeed writes into ZeRO optimizer shards (stage enum, loss scaler, fragment addresses).
DEEPSPEED_NAMES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
# Names accelerate writes into random_states_<rank>.pkl (numpy's RNG state); accelerate allowlists the same ones.
NUMPY_NAMES = (
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    "_codecs.encode",
)
PICKLE_SUFFIXES = (".pt", ".bin", ".pkl", ".pth")


class Opaque:
    """Stand-in for a library object inside a checkpoint: keeps its constructor arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def safe_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's names as inert stand-ins; one line if refused."""
    import numpy as np

    numpy_globals: list[Any] = [np.ndarray, np.dtype, np.dtypes.UInt32DType]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    numpy_globals.append(_reconstruct)
    allowed = [(Opaque, name) for name in DEEPSPEED_NAMES] + numpy_globals
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as err:
        culprit = _disallowed_names(path)
        reason = f"it would call {culprit[0]}" if culprit else _first_reason(err)
        raise DataError(f"{path}: refused to load ({reason}); checkpoint files must hold plain tensor data") from None


def _first_reason(err: BaseException) -> str:
    text = str(err)
    marker = "Unsupported global: GLOBAL "
    if marker in text:
        name = text.split(marker, 1)[1].split()[0]
        return f"it would call {name}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(err).__name__


def _disallowed_names(path: Path) -> list[str]:
    """Functions/classes a pickle names beyond torch's defaults and our list (read from its opcodes, not run)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return []
    allowed = set(DEEPSPEED_NAMES) | set(NUMPY_NAMES)
    return [n for n in names if n not in allowed]


def verify_checkpoint_files(folder: Path) -> None:
    """Refuse a checkpoint folder if any pickle in it names a function or class outside the known list.

    Scans the pickles' opcodes only (``torch.serialization.get_unsafe_globals_in_checkpoint``); nothing is executed.
    Non-zip pickles (never written by torch.save since 1.6) are refused outright.
    """
    allowed = set(DEEPSPEED_NAMES) | set(NUMPY_NAMES)
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or path.suffix not in PICKLE_SUFFIXES:
            continue
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:
            raise DataError(
                f"{path}: not a torch.save checkpoint file ({_first_reason(err)}); refusing to resume from it"
            ) from None
        bad = [n for n in names if n not in allowed]
        if bad:
            raise DataError(
                f"{path}: refers to {bad[0]}, which a checkpoint never needs; refusing to load it (the file may have "
                "been tampered with)"
            )
