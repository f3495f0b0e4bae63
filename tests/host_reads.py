"""Counting host reads of tensor values (issue #28): the patches the sync audits put on ``torch.Tensor``.

A read of a tensor's value on the host (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, printing, ...) waits
for every kernel queued before it on a GPU. On this CPU-only machine nothing waits, so the audits count the calls
instead: ``watch`` replaces each read method with one that records who called it, for the test's (or the rank's)
duration. A read is charged to the nearest Linnaeus frame on the stack, so a read made inside torch, accelerate or
DeepSpeed on the trainer's behalf counts as the trainer's; reads of tensors that live on the host on every device
(``HOST_SIDE``) are not counted.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

LINNAEUS = str(Path(__file__).resolve().parents[1] / "linnaeus")

# Reads of tensors that live on the host on every device: the loader's batch before it is moved (the image_ok
# count, the device decoder's offsets and boxes), HostReadback's pinned copy (read after its own event, a step
# later) and mixing's numbers drawn from a CPU generator. Anything else read from Linnaeus code in a step is a sync.
HOST_SIDE = {("train_meter.py", "count_missing"), ("readback.py", "values"), ("mix.py", "draw_mix_numbers")}
HOST_SIDE_FILES = (str(Path(LINNAEUS) / "data"),)
READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__repr__", "__format__")


def charged_to(frame) -> str | None:
    """Where a read made in ``frame`` is charged: ``file:line func()`` of the nearest Linnaeus frame at or above it,
    or None when it is host-side (``HOST_SIDE``) or no Linnaeus code is on the stack."""
    while frame is not None:
        where = frame.f_code.co_filename
        if where.startswith(LINNAEUS):
            func = frame.f_code.co_name
            if where.startswith(HOST_SIDE_FILES) or (Path(where).name, func) in HOST_SIDE:
                return None
            return f"{Path(where).relative_to(LINNAEUS)}:{frame.f_lineno} {func}()"
        frame = frame.f_back
    return None


def _short(path: str) -> str:
    """``site-packages/deepspeed/runtime/engine.py`` -> ``deepspeed/runtime/engine.py``."""
    parts = Path(path).parts
    return "/".join(parts[parts.index("site-packages") + 1 :]) if "site-packages" in parts else path


def watch(record: Callable[[str], None], direct_only: bool = False) -> Callable[[], None]:
    """Patch every method in ``READS``; ``record`` gets ``"<charged_to> Tensor.<method>"`` per counted read. With
    ``direct_only`` only reads called directly from Linnaeus code count. Returns the function that undoes it."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    busy = [False]  # a read inside a read (repr formatting its elements) counts once

    def make(name: str):
        original = originals[name]

        def read(self, *args, **kwargs):
            if busy[0]:
                return original(self, *args, **kwargs)
            caller = sys._getframe(1)
            if direct_only and not caller.f_code.co_filename.startswith(LINNAEUS):
                where = None
            else:
                where = charged_to(caller)
            if where is not None and not caller.f_code.co_filename.startswith(LINNAEUS):
                where += f" via {_short(caller.f_code.co_filename)}:{caller.f_lineno} {caller.f_code.co_name}()"
            busy[0] = True
            try:
                return original(self, *args, **kwargs)
            finally:
                busy[0] = False
                if where is not None:
                    record(f"{where} Tensor.{name}")

        return read

    for name in READS:
        setattr(torch.Tensor, name, make(name))

    def undo() -> None:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)

    return undo
