"""Epoch sampler and DataLoader construction for map-style datasets (FileDataset).

Every process gets the same number of samples and therefore the same number of batches (an uneven count hangs
collective ops). Training drops the tail: each epoch's shuffled order is cut to ``floor(N / world) * world``, so a
different few samples sit out each epoch. Validation pads instead: the order is extended with repeats from its
start to ``ceil(N / world) * world`` and the repeats carry ``is_pad = True`` so metrics can leave them out.
Process ``rank`` takes positions ``rank, rank + world, ...`` of the epoch order (as DistributedSampler).

The order of epoch ``e`` is a pure function of ``(seed, e)``; keys are ``(index, epoch, is_pad)`` so the dataset
derives per-sample randomness from them. Resuming mid-epoch: ``set_epoch(e, start_batch=k)`` (or
``load_state_dict``) skips exactly the first ``k`` batches of this process's list, so the run continues with the
remaining samples, none skipped or repeated. The sampler cannot see how far the loader's prefetching consumer has
got, so the caller passes the number of batches it actually finished to ``state_dict``.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from linnaeus.data.encoded import collate_samples
from linnaeus.errors import LinnaeusError
from linnaeus.utils.signals import STOP_SIGNALS, process_alive

log = logging.getLogger(__name__)

Key = tuple[int, int, bool]


def _check_modes(num_replicas: int, drop_last: bool, pad: bool) -> None:
    if drop_last and pad:
        raise ValueError("EpochSampler: choose drop_last (training) or pad (validation), not both")
    if num_replicas > 1 and not (drop_last or pad):
        raise ValueError("EpochSampler: with several processes set drop_last or pad so every rank gets equal batches")


def samples_per_rank(num_samples: int, *, num_replicas: int = 1, drop_last: bool = True, pad: bool = False) -> int:
    """How many samples each process sees per epoch."""
    _check_modes(num_replicas, drop_last, pad)
    if drop_last:
        return num_samples // num_replicas
    return math.ceil(num_samples / num_replicas)


def loader_num_batches(
    num_samples: int, *, batch_size: int, num_replicas: int = 1, drop_last: bool = True, pad: bool = False
) -> int:
    """Batches per epoch on every process for a loader built by ``build_loader`` with the same arguments."""
    per_rank = samples_per_rank(num_samples, num_replicas=num_replicas, drop_last=drop_last, pad=pad)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


class EpochSampler(Sampler[Key]):
    """Yields ``(index, epoch, is_pad)`` for this process; see the module docstring for the rules."""

    def __init__(
        self,
        num_samples: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        pad: bool = False,
        batch_size: int = 1,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"EpochSampler: rank {rank} is not in [0, {num_replicas})")
        if batch_size < 1:
            raise ValueError(f"EpochSampler: batch_size must be >= 1, got {batch_size}")
        _check_modes(num_replicas, drop_last, pad)
        self.num_samples = int(num_samples)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.pad = bool(pad)
        self.batch_size = int(batch_size)
        self.epoch = 0
        self.start = 0  # samples of this rank's epoch list already consumed (mid-epoch resume)

    @property
    def per_rank(self) -> int:
        return samples_per_rank(
            self.num_samples, num_replicas=self.num_replicas, drop_last=self.drop_last, pad=self.pad
        )

    def set_epoch(self, epoch: int, start_batch: int = 0, batch_size: int | None = None) -> None:
        """Select the epoch; skip the first ``start_batch`` batches (of ``batch_size``, default the loader's)."""
        bs = self.batch_size if batch_size is None else int(batch_size)
        start = int(start_batch) * bs
        if start < 0 or start > self.per_rank:
            raise ValueError(f"EpochSampler: start {start} is outside this rank's epoch of {self.per_rank} samples")
        self.epoch = int(epoch)
        self.start = start

    def epoch_keys(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """This rank's full list for ``epoch`` (default: the current one): (indices int64, is_pad bool)."""
        epoch = self.epoch if epoch is None else int(epoch)
        n, world = self.num_samples, self.num_replicas
        if self.shuffle:
            order = np.random.default_rng((self.seed % 2**64, epoch % 2**64)).permutation(n).astype(np.int64)
        else:
            order = np.arange(n, dtype=np.int64)
        total = self.per_rank * world
        if total <= n:
            order, is_pad = order[:total], np.zeros(total, dtype=bool)
        else:  # pad with repeats taken cyclically from the start of the order
            order = np.concatenate([order, np.resize(order, total - n)])
            is_pad = np.arange(total) >= n
        return order[self.rank :: world], is_pad[self.rank :: world]

    def __iter__(self) -> Iterator[Key]:
        indices, is_pad = self.epoch_keys()
        epoch = self.epoch
        for i in range(self.start, len(indices)):
            yield int(indices[i]), epoch, bool(is_pad[i])

    def __len__(self) -> int:
        """Samples left in this epoch for this rank (the whole epoch unless resuming mid-epoch)."""
        return self.per_rank - self.start

    def state_dict(self, batches_done: int = 0) -> dict[str, Any]:
        """Position after ``batches_done`` batches of the current iteration (counted since ``set_epoch``)."""
        return {
            "epoch": self.epoch,
            "start_sample": min(self.start + int(batches_done) * self.batch_size, self.per_rank),
            "num_samples": self.num_samples,
            "num_replicas": self.num_replicas,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "pad": self.pad,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_samples", "num_replicas", "seed", "shuffle", "drop_last", "pad"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"EpochSampler: saved {key}={state[key]!r} but this run has {getattr(self, key)!r}; "
                    "a sample-exact resume needs the same dataset, process count and seed"
                )
        self.set_epoch(int(state["epoch"]), start_batch=int(state["start_sample"]), batch_size=1)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the stop signals (SIGTERM, SIGINT, SIGHUP, SIGUSR1/2). SLURM
    (and Ctrl-C, a closed terminal) signal every process of a job; a worker that died of it would crash its rank
    before the rank could write its preemption checkpoint. The rank ends its workers itself when it stops
    iterating. Seeding is untouched (it happens before this runs)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _start_worker(rank_pid: int, worker_id: int) -> None:
    """The ``worker_init_fn`` proper: ignore stop signals, and end this worker when its rank is gone.

    Workers are children of the forkserver, not of the rank, and each holds the server's "a client is alive" pipe,
    so after a SIGKILL of the rank (the OOM killer's choice) neither the server nor the workers would ever notice:
    torch's worker watchdog watches the parent, which is the server. A thread here watches the rank itself; when
    the workers exit, the server reads the end of its pipe and exits, and the resource tracker with them."""
    ignore_stop_signals(worker_id)
    threading.Thread(target=_exit_without, args=(rank_pid,), name="linnaeus-rank-watch", daemon=True).start()


def _exit_without(rank_pid: int, poll_s: float = 1.0) -> None:
    while process_alive(rank_pid):
        time.sleep(poll_s)
    os._exit(0)  # nobody is left to read what this worker makes


def _end_leftover_workers() -> None:
    # multiprocessing's own exit handler ends daemonic children (loader workers) with SIGTERM, then waits for them;
    # ours ignore SIGTERM, so one whose loader was never shut down (its iterator still referenced by an exception's
    # traceback when the process exits) would keep the process waiting forever. SIGKILL them first.
    # torch's SIGCHLD handler would raise "worker killed" from inside the join below: we are ending them on purpose.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    for child in workers:
        child.kill()
    for child in workers:
        child.join(timeout=10)


_exit_guard = False

# What the forkserver imports once, so that each worker it forks starts with the data code already loaded. Not
# "__main__": a script's body would run in the server (workers still run it, as "__mp_main__", like spawn's do).
_SERVER_PRELOAD = ["linnaeus.data.dataset", "linnaeus.data.shards.reader"]


def worker_context(num_workers: int, requested: Any = None) -> Any:
    """The multiprocessing context of every Linnaeus DataLoader (None without workers; ``requested`` when a caller
    asks for one): a forkserver (spawn where the platform has none), never a fork of the training process itself.

    A training process has C++ threads that enter Python on their own: gloo's run loops (and NCCL's watchdog)
    release each finished collective's tensors and take a fresh Python thread state to do it. On Python 3.11 a
    fork in that instant copies CPython's thread-state lock as held, and the child waits on it forever inside
    ``os.fork()`` (its ``_PyThreadState_DeleteExcept``). Distributed runs hit this at epoch starts. The forkserver
    is a fresh interpreter with no such threads; workers are forked from it and receive the dataset pickled, its
    large arrays as shared memory (``worker_share``).

    The server is started with the stop signals blocked, and its workers inherit that: a preemption signal sent to
    every process of the job must not end the server or its workers before the rank has written its checkpoint
    (the workers ignore them anyway, ``ignore_stop_signals``). It exits when this process and its workers are gone
    (the workers watch this process, ``_start_worker``).
    """
    if num_workers <= 0 or requested is not None:
        return requested if num_workers > 0 else None
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    from multiprocessing import forkserver, resource_tracker

    # Not the `-m` main module either (`linnaeus.train`): each worker runs it again as "__mp_main__" through runpy,
    # which warns "'linnaeus.train' found in sys.modules ... unpredictable behaviour" when the server imported it.
    ctx.set_forkserver_preload(list(_SERVER_PRELOAD))
    # The server starts its resource tracker first; starting that unblocks SIGTERM/SIGINT in this thread again
    # (it protects itself by ignoring them), so it is started before our block.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        forkserver.ensure_running()  # a no-op while it runs; the signal mask passes to it through exec
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return ctx


def worker_init(num_workers: int) -> Any:
    """The ``worker_init_fn`` of every Linnaeus DataLoader (None without workers): ``ignore_stop_signals`` and an
    exit when this process is gone (``_start_worker``), plus, in this process, an exit handler that ends workers
    left running (atexit runs it before multiprocessing's)."""
    global _exit_guard
    if num_workers <= 0:
        return None
    if not _exit_guard:
        atexit.register(_end_leftover_workers)
        _exit_guard = True
    return functools.partial(_start_worker, os.getpid())


_clamp_said: set[tuple[int, int]] = set()


def usable_workers(requested: int) -> int:
    """``requested`` loader workers, at most the CPU cores this process may use (torch's own bound: it warns "will
    create N worker processes ... suggested max" beyond it). Says so once per (requested, usable) pair."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested <= cores:
        return requested
    if (requested, cores) not in _clamp_said:
        _clamp_said.add((requested, cores))
        log.info(
            "DATA.NUM_WORKERS %d is more than the %d CPU core%s this process may use: %d loader workers",
            requested,
            cores,
            "s" if cores != 1 else "",
            cores,
        )
    return cores


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    drop_last: bool = True,
    pad: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    persistent_workers: bool = False,
    multiprocessing_context: Any = None,
) -> tuple[DataLoader, EpochSampler]:
    """A DataLoader over ``dataset`` driven by an ``EpochSampler``; call ``sampler.set_epoch`` before each epoch."""
    sampler = EpochSampler(
        len(dataset),  # type: ignore[arg-type]
        num_replicas=num_replicas,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        pad=pad,
        batch_size=batch_size,
    )
    workers = usable_workers(int(num_workers))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        # a dataset may finish its batches itself (FileDataset with decode="worker" decodes them in the worker)
        collate_fn=getattr(dataset, "collate_fn", collate_samples),
        pin_memory=pin_memory,
        drop_last=drop_last,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=persistent_workers and workers > 0,
        multiprocessing_context=worker_context(workers, multiprocessing_context),
        worker_init_fn=worker_init(workers),
        # A private generator: DataLoader draws each iterator's worker base seed from it, which would otherwise
        # consume the global torch RNG and make the trainer's random stream depend on when loaders start.
        generator=torch.Generator().manual_seed(seed % 2**63),
    )
    return loader, sampler


def unwrap_worker_error(err: BaseException) -> BaseException:
    """The original one-line error behind a DataLoader worker's re-raised copy.

    A worker's exception reaches the main process rebuilt as ``type(err)("Caught X in DataLoader worker ...
    Original Traceback ... X: <message>")``; for a ``LinnaeusError`` this returns the same type with just
    ``<message>`` so the CLI prints one clean line. Anything else is returned unchanged.
    """
    text = err.args[0] if err.args and isinstance(err.args[0], str) else ""
    if not isinstance(err, LinnaeusError) or not text.startswith("Caught ") or "DataLoader worker" not in text:
        return err
    marker = f"{type(err).__module__}.{type(err).__qualname__}: "
    last = text.rstrip().rsplit(marker, 1)
    return type(err)(last[1].strip()) if len(last) == 2 else err
