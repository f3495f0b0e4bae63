"""Loading the pickled files of a run folder without running code from them.

Checkpoint folders hold ``torch.save`` pickles written by DeepSpeed and accelerate (ZeRO model/optimizer shards, RNG
states). A pickle can call any importable function, so a crafted file would run code the moment it is unpickled.
Everything here loads with ``weights_only=True``: tensors, plain containers and an exact list of names these
libraries are known to write. DeepSpeed's few classes are rebuilt as inert stand-ins (``Opaque``), so reading a
checkpoint needs no DeepSpeed import and no class of theirs runs.

``verify_checkpoint_files`` scans every pickle in a folder *without loading it* and refuses any name outside that
list, and any link that leaves the run folder (a symlinked subfolder is entered, not skipped); resume calls it before
DeepSpeed/accelerate touch the folder. Those libraries unpickle with ``weights_only=False``, so their loads also run
inside ``weights_only_loads``: every ``torch.load`` then is ``weights_only=True`` with the same list, the real
classes allowed. A file swapped in after the scan is refused too.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
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
    allowed = [(Opaque, name) for name in DEEPSPEED_NAMES] + _numpy_globals()
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


def _numpy_globals() -> list[Any]:
    import numpy as np

    found: list[Any] = [np.ndarray, np.dtype, np.dtypes.UInt32DType]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [*found, _reconstruct]


def _deepspeed_classes() -> list[Any]:
    """DeepSpeed's own classes for ``DEEPSPEED_NAMES`` (DeepSpeed is loading its checkpoint, so it is installed)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's and accelerate's, which ask for ``weights_only=False``) loads with
    ``weights_only=True``: tensors, plain containers and the listed names only; anything else is refused with one
    line naming the file before any of its code could run."""
    import codecs

    original = torch.load
    allowed = [*_deepspeed_classes(), *_numpy_globals(), codecs.encode]

    def guarded(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as err:
            if not isinstance(f, str | os.PathLike):
                raise
            culprit = _disallowed_names(Path(f))
            reason = f"it would call {culprit[0]}" if culprit else _first_reason(err)
            raise DataError(f"{f}: refused to load ({reason}); checkpoint files must hold plain tensor data") from None

    torch.load = guarded  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


def _is_pickle(path: Path) -> bool:
    """Could ``torch.load`` read this file? Known suffixes, or a zip (torch.save) or pickle header whatever its name."""
    if path.suffix in PICKLE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return True  # unreadable: let the scan below report it
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def checkpoint_files(folder: Path, root: Path | None = None) -> list[Path]:
    """Every file under ``folder``, links followed (a symlinked subfolder is entered, not skipped); a link whose
    target leaves ``root`` (default: the checkpoints folder holding ``folder``, as its real path, so a run whose
    whole ``checkpoints/`` is a link to scratch space still loads) or a loop of links is refused with one line."""
    root = Path(root) if root is not None else Path(folder).parent
    root_real = Path(os.path.realpath(root))
    folder = Path(folder)
    found: list[Path] = []
    seen: set[str] = set()

    def inside(path: Path) -> None:
        real = os.path.realpath(path)
        if Path(real) != root_real and root_real not in Path(real).parents:
            raise DataError(
                f"{path}: links to {real}, outside {root}; refusing to load a checkpoint through it (the folder may "
                "have been tampered with)"
            )

    inside(folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real_dir = os.path.realpath(dirpath)
        if real_dir in seen:
            raise DataError(f"{dirpath}: a loop of links inside {folder}; refusing to load a checkpoint from it")
        seen.add(real_dir)
        for name in dirnames:
            inside(Path(dirpath) / name)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            inside(path)
            found.append(path)
    return sorted(found)


def verify_checkpoint_files(folder: Path, root: Path | None = None) -> None:
    """Refuse a checkpoint folder if any pickle in it names a function or class outside the known list, or if any
    link in it leaves ``root`` (see ``checkpoint_files``).

    Scans the pickles' opcodes only (``torch.serialization.get_unsafe_globals_in_checkpoint``); nothing is executed.
    Non-zip pickles (never written by torch.save since 1.6) are refused outright.
    """
    folder = Path(folder)
    allowed = set(DEEPSPEED_NAMES) | set(NUMPY_NAMES)
    for path in checkpoint_files(folder, root):
        if not path.is_file():
            raise DataError(f"{path}: not a regular file; refusing to load a checkpoint from {folder}")
        if not _is_pickle(path):
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
