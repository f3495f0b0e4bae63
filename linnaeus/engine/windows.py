"""Accumulation windows: the training batches of one optimizer step, with epochs as a view over steps."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from linnaeus.engine.schedule import StepPlan

Batch = dict[str, Any]


class TrainBatches(Protocol):
    """What the loop needs from a training stream (``linnaeus.data.stream.BatchStream``)."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def __iter__(self) -> Iterator[Batch]: ...


def accumulation_windows(stream: TrainBatches, plan: StepPlan, start_step: int = 0) -> Iterator[list[Batch]]:
    """Yields, for optimizer steps ``start_step``, ``start_step + 1``, ..., the ``plan.accumulation`` micro-batches of
    that step, endlessly.

    The stream is positioned once per epoch (``set_epoch(epoch, start_batch)``; mid-epoch on resume), and only whole
    windows are taken from it: a tail that cannot fill a window is left unread, on every process alike.
    """
    step = start_step
    while True:
        epoch, start_batch = plan.position(step)
        stream.set_epoch(epoch, start_batch=start_batch)
        batches = iter(stream)
        for _ in range(plan.steps_per_epoch - step % plan.steps_per_epoch):
            window = []
            for _ in range(plan.accumulation):
                batch = next(batches, None)
                if batch is None:
                    raise RuntimeError(
                        f"the training stream ended inside epoch {epoch} before step {step + 1}; it promised "
                        f"{plan.batches_per_epoch} batches per epoch"
                    )
                window.append(batch)
            yield window
            step += 1
