"""The training meter: a loss window (the losses between two train rows of ``metrics.jsonl``) and the run's counters
(training time and throughput, data wait, unreadable images, decode fallbacks).

Two collectives, both named at their call sites by the ``reduce_sum`` they are handed: ``TrainMeter.flush`` (one
all-reduce: the window's row) and ``RunCounters.sync`` (one all-reduce: the exact unreadable-image count, called
before every checkpoint). ``state_dict`` is a plain read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from linnaeus.engine.schedule import StepPlan, fires

Reduce = Callable[[torch.Tensor], torch.Tensor]


class LossWindow:
    """The losses of the micro-batches since the last row, summed on the device (a host read per micro-batch would
    stall the GPU pipeline): the total loss, then one per rank; and how many micro-batches and photos they held."""

    def __init__(self, task_keys: list[str], device: torch.device) -> None:
        self.task_keys = list(task_keys)
        self.sums = torch.zeros(1 + len(self.task_keys), device=device)
        self.micro_batches = 0
        self.images = 0

    def add(self, loss: torch.Tensor, per_task: dict[str, torch.Tensor], images: int) -> None:
        self.sums += torch.stack([loss.detach(), *(per_task[k].detach() for k in self.task_keys)]).float()
        self.micro_batches += 1
        self.images += images

    def reset(self) -> None:
        self.sums.zero_()
        self.micro_batches = 0
        self.images = 0


class RunCounters:
    """This process's run totals, on the host: training time (pauses left out), time spent waiting for batches,
    micro-batches trained; unreadable images (the run total over all processes as of the last ``sync``, plus this
    process's count since) and the device decoder's fallbacks (read from ``decode_fallbacks``, the decoder's own
    counter)."""

    def __init__(
        self,
        plan: StepPlan,
        device: torch.device,
        clock: Callable[[], float] = time.perf_counter,
        decode_fallbacks: Callable[[], int] = lambda: 0,
    ) -> None:
        self.plan = plan
        self.device = device  # where the collective's tensor lives (NCCL reduces CUDA tensors only)
        self.clock = clock
        self.decode_fallbacks = decode_fallbacks
        self.started: float | None = None  # training began (first ``TrainMeter.restart``)
        self.paused_total = 0.0
        self.wait_total = 0.0
        self.micro_batches = 0
        self.images = 0  # photos trained on by this process (an observation counts its views present)
        self.missing_images = 0  # run total over all processes, as of the last sync
        self.missing_local = 0  # this process, since the last sync

    def count_missing(self, batch: dict[str, Any]) -> None:
        """Count the batch's unreadable images (``image_ok`` is False; a host tensor, so no device sync)."""
        ok = batch.get("image_ok")
        if ok is not None:
            self.missing_local += int((~ok.bool()).sum())

    def sync(self, reduce_sum: Reduce | None) -> None:
        """Collective (every process calls it at the same step): fold every process's unreadable-image count into
        the run total, so the checkpoint saved next holds the exact count of the steps it contains."""
        local = torch.tensor([float(self.missing_local)], dtype=torch.float64, device=self.device)
        self.fold(local if reduce_sum is None else reduce_sum(local))

    def fold(self, summed: torch.Tensor) -> None:
        """Add the all-processes sum of ``missing_local`` (already reduced) to the run total."""
        self.missing_images += round(float(summed.sum()))
        self.missing_local = 0

    @property
    def train_seconds(self) -> float:
        """Training time of this process so far (data waits included, pauses not)."""
        return 0.0 if self.started is None else max(self.clock() - self.started - self.paused_total, 0.0)

    @property
    def mean_images_per_sec(self) -> float | None:
        seconds = self.train_seconds
        if not self.micro_batches or seconds <= 0:
            return None
        return self.images * self.plan.world_size / seconds

    @property
    def data_wait_share(self) -> float | None:
        seconds = self.train_seconds
        return min(self.wait_total / seconds, 1.0) if seconds > 0 else None

    def state_dict(self) -> dict[str, Any]:
        """The unreadable-image count as of the last ``sync`` (the trainer syncs before every save)."""
        return {"missing_images": self.missing_images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.missing_images = int(state.get("missing_images", 0))
        self.missing_local = 0


class TrainMeter:
    """Turns the loss window into a train row every ``log_every`` steps: the mean optimizer-step loss and per-rank
    losses over the window and all processes, images/s over the window's training time (time inside ``paused()``
    left out: validation, checkpoints), the window's data-wait share, and the run's decode fallbacks."""

    def __init__(
        self,
        task_keys: list[str],
        device: torch.device,
        plan: StepPlan,
        log_every: int | None,
        clock: Callable[[], float] = time.perf_counter,
        decode_fallbacks: Callable[[], int] = lambda: 0,
    ) -> None:
        self.plan = plan
        self.log_every = log_every
        self.clock = clock
        self.losses = LossWindow(task_keys, device)
        self.counters = RunCounters(plan, device, clock, decode_fallbacks)
        self.window_start = clock()
        self.window_wait = 0.0  # seconds of this window spent waiting for batches

    def add(self, loss: torch.Tensor, per_task: dict[str, torch.Tensor], images: int | None = None) -> None:
        """One micro-batch's losses; ``images``: the photos it held (default: a full micro-batch of single images;
        a multi-view micro-batch passes its views present, so images/s counts photos, not observations)."""
        images = self.plan.micro_batch if images is None else images
        self.losses.add(loss, per_task, images)
        self.counters.micro_batches += 1
        self.counters.images += images

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
            self.counters.wait_total += waited
            yield item

    def due(self, step: int) -> bool:
        return fires(self.log_every, step, self.plan)

    def restart(self) -> None:
        """Start a fresh window now (at the start of training or after a resume)."""
        self.losses.reset()
        self.window_start = self.clock()
        self.window_wait = 0.0
        if self.counters.started is None:
            self.counters.started = self.window_start

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training time (images/s stays a training throughput)."""
        start = self.clock()
        try:
            yield
        finally:
            paused = self.clock() - start
            self.window_start += paused
            self.counters.paused_total += paused

    def flush(self, reduce_sum: Reduce | None) -> dict[str, float]:
        """Collective (one all-reduce, ``reduce_sum``). The window's row (``loss``, ``images_per_sec``,
        ``data_wait_share``, ``decode_fallbacks``, ``<rank>/loss``; on CUDA also ``max_memory_gib``, the peak
        allocated so far), then a fresh window. The unreadable-image count rides along (``RunCounters.fold``).

        Each micro-batch loss is a share of its step's loss (see ``TaskLoss.task_losses`` with step denominators):
        summed over a step's micro-batches and processes it is accumulation × world size × the step loss."""
        elapsed = max(self.clock() - self.window_start, 1e-9)
        sums, c = self.losses.sums, self.counters
        counters = [float(c.decode_fallbacks()), float(c.missing_local)]
        packed = torch.cat([sums.double(), sums.new_tensor(counters, dtype=torch.float64)])
        if reduce_sum is not None:
            packed = reduce_sum(packed)
        values = packed.tolist()
        c.fold(torch.tensor([values[-1]]))
        micro = self.losses.micro_batches
        # No micro-batch: every step of the window was skipped as non-finite; its loss is unknown, not 0.
        shares = micro * self.plan.world_size or float("nan")
        row = {
            "loss": values[0] / shares,
            # Photos per second over all processes (each process counts its own; they hold alike batches).
            "images_per_sec": self.losses.images * self.plan.world_size / elapsed,
            "data_wait_share": min(self.window_wait / elapsed, 1.0),
            "decode_fallbacks": round(values[-2]),  # all processes, since the run (re)started
        }
        row |= {f"{k}/loss": v / shares for k, v in zip(self.losses.task_keys, values[1:-2], strict=True)}
        if sums.device.type == "cuda":  # the allocator's own counter: no device sync
            row["max_memory_gib"] = torch.cuda.max_memory_allocated(sums.device) / 2**30
        self.restart()
        return row
