"""Reading small device tensors on the host without stalling the GPU.

``tensor.item()`` / ``.tolist()`` on a CUDA tensor waits for *every* kernel queued on the stream, including the
next step's work the host has already launched, so the GPU runs dry while the host catches up. ``HostReadback``
instead queues a copy into pinned host memory right after the value is produced and records an event; reading it
later (typically one optimizer step later) waits only for that event, which has long passed by then.
"""

from __future__ import annotations

import torch


class HostReadback:
    """The values of ``tensor`` as they are now, readable on the host later through ``values()``."""

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self._event: torch.cuda.Event | None = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:  # host memory already (CPU runs, tests): a copy, so later in-place updates do not show through
            self._host = tensor.to("cpu", copy=True)

    def values(self) -> list[float]:
        """The copied values (flattened); waits for the copy itself, not for work queued after it."""
        if self._event is not None:
            self._event.synchronize()
        return [float(v) for v in self._host.flatten().tolist()]
