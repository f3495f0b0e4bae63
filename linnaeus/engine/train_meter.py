"""The training meter: the logging window's loss sums, throughput and the unreadable-image count."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from linnaeus.engine.schedule import StepPlan, fires

Reduce = Callable[[torch.Tensor], torch.Tensor]


class TrainMeter:
    """Owns the logging window between two train rows of ``metrics.jsonl``.

    Per micro-batch, ``add`` accumulates the loss on the device (a host read per micro-batch would stall the GPU
    pipeline); ``flush`` (collective: one all-reduce) turns the window into a row: the mean optimizer-step loss and
    per-rank losses over the window and all processes, and images/s over the window's training time, which leaves
    out time spent inside ``paused()`` (validation, checkpoints). Unreadable images replaced by the loader are
    counted per batch; ``state_dict`` (collective) folds every process's count into the run total, so each
    checkpoint holds the exact count of the steps it contains.
    """

    def __init__(
        self,
        task_keys: list[str],
        device: torch.device,
        plan: StepPlan,
        log_every: int | None,
        reduce_sum: Reduce | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.task_keys = list(task_keys)
        self.plan = plan
        self.log_every = log_every
        self.reduce_sum = reduce_sum
        self.clock = clock
        # loss, then one per rank; summed per micro-batch, on the device
        self.sums = torch.zeros(1 + len(self.task_keys), device=device)
        self.micro_batches = 0
        self.window_start = clock()
        self.window_wait = 0.0  # seconds of this window spent waiting for batches
        self.started: float | None = None  # first restart(): training began
        self.paused_total = 0.0
        self.wait_total = 0.0
        self.micro_batches_total = 0
        self.missing_images = 0  # run total over all processes, as of the last fold
        self.missing_local = 0  # this process, since the last fold
        self.decode_fallbacks_local = 0  # images this process's device decoder sent to the CPU decoder, run total

    # ------------------------------------------------------------------------------------------- per micro-batch
    def count_missing(self, batch: dict[str, Any]) -> None:
        """Count the batch's unreadable images (``image_ok`` is False; a host tensor, so no device sync)."""
        ok = batch.get("image_ok")
        if ok is not None:
            self.missing_local += int((~ok.bool()).sum())

    def add(self, loss: torch.Tensor, per_task: dict[str, torch.Tensor]) -> None:
        self.sums += torch.stack([loss.detach(), *(per_task[k].detach() for k in self.task_keys)]).float()
        self.micro_batches += 1
        self.micro_batches_total += 1

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """``batches``, measuring how long each ``next`` waits (data loading the step could not hide)."""
        it = iter(batches)
        while True:
            start = self.clock()
            try:
                item = next(it)
            except StopIteration:
                return
            waited = self.clock() - start
            self.window_wait += waited
            self.wait_total += waited
            yield item

    # ------------------------------------------------------------------------------------------- window
    def due(self, step: int) -> bool:
        return fires(self.log_every, step, self.plan)

    def restart(self) -> None:
        """Start a fresh window now (at the start of training or after a resume)."""
        self.sums.zero_()
        self.micro_batches = 0
        self.window_start = self.clock()
        self.window_wait = 0.0
        if self.started is None:
            self.started = self.window_start

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training time (images/s stays a training throughput)."""
        start = self.clock()
        try:
            yield
        finally:
            paused = self.clock() - start
            self.window_start += paused
            self.paused_total += paused

    # ------------------------------------------------------------------------------------------- run totals
    @property
    def train_seconds(self) -> float:
        """Training time of this process so far (data waits included, pauses not)."""
        return 0.0 if self.started is None else max(self.clock() - self.started - self.paused_total, 0.0)

    @property
    def mean_images_per_sec(self) -> float | None:
        seconds = self.train_seconds
        if not self.micro_batches_total or seconds <= 0:
            return None
        return self.micro_batches_total * self.plan.micro_batch * self.plan.world_size / seconds

    @property
    def data_wait_share(self) -> float | None:
        seconds = self.train_seconds
        return min(self.wait_total / seconds, 1.0) if seconds > 0 else None

    def flush(self) -> dict[str, float]:
        """Collective. The window's row (``loss``, ``images_per_sec``, ``data_wait_share``, ``<rank>/loss``; on CUDA
        also ``max_memory_gib``, the peak allocated so far), then a fresh window.

        Each micro-batch loss is a share of its step's loss (see ``TaskLoss.task_losses`` with step denominators):
        summed over a step's micro-batches and processes it is accumulation × world size × the step loss."""
        elapsed = max(self.clock() - self.window_start, 1e-9)
        counters = [float(self.decode_fallbacks_local), float(self.missing_local)]
        packed = torch.cat([self.sums.double(), self.sums.new_tensor(counters, dtype=torch.float64)])
        if self.reduce_sum is not None:
            packed = self.reduce_sum(packed)
        values = packed.tolist()
        self.missing_images += round(values[-1])
        self.missing_local = 0
        # No micro-batch: every step of the window was skipped as non-finite; its loss is unknown, not 0.
        shares = self.micro_batches * self.plan.world_size or float("nan")
        row = {
            "loss": values[0] / shares,
            "images_per_sec": self.micro_batches * self.plan.micro_batch * self.plan.world_size / elapsed,
            "data_wait_share": min(self.window_wait / elapsed, 1.0),
            "decode_fallbacks": round(values[-2]),  # all processes, since the run (re)started
        }
        row |= {f"{k}/loss": v / shares for k, v in zip(self.task_keys, values[1:-2], strict=True)}
        if self.sums.device.type == "cuda":  # the allocator's own counter: no device sync
            row["max_memory_gib"] = torch.cuda.max_memory_allocated(self.sums.device) / 2**30
        self.restart()
        return row

    # ------------------------------------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Collective (every process calls it while saving): the exact unreadable-image count so far."""
        local = torch.tensor([float(self.missing_local)], dtype=torch.float64, device=self.sums.device)
        if self.reduce_sum is not None:
            local = self.reduce_sum(local)
        self.missing_images += round(local.item())
        self.missing_local = 0
        return {"missing_images": self.missing_images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.missing_images = int(state.get("missing_images", 0))
        self.missing_local = 0
