"""FileDataset + EpochSampler + build_loader: sample contents, worker-count invariance, spawn, ranks, resume."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from linnaeus.data import worker_share
from linnaeus.data.dataset import PLACEHOLDER_VALUE, FileDataset
from linnaeus.data.loader import EpochSampler, build_loader, loader_num_batches, unwrap_worker_error
from linnaeus.data.samples import SampleTable
from linnaeus.errors import DataError

N = 10
IMG = 32


def make_dataset(tmp_path: Path, *, train: bool = True, allow_missing: bool = False, broken: int | None = None):
    paths = []
    for i in range(N):
        rng = np.random.default_rng(i)
        arr = rng.integers(0, 256, size=(40 + 3 * i, 56, 3), dtype=np.uint8)
        p = tmp_path / f"img_{i:03d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(str(p))
    if broken is not None:
        Path(paths[broken]).unlink()
    rows = np.arange(N, dtype=np.int64) * 10 + 7  # rows in labels.h5 differ from dataset positions
    targets = {"taxa_L10": np.arange(N) % 3 - 1, "taxa_L20": np.arange(N) % 2}
    meta = np.arange(N * 5, dtype=np.float32).reshape(N, 5)
    meta_valid = np.stack([np.arange(N) % 2 == 0, np.ones(N, bool)], axis=1)
    table = SampleTable(rows, targets, meta, meta_valid, paths)
    return FileDataset(table, img_size=IMG, train=train, allow_missing=allow_missing, seed=3)


def test_sample_contents_and_types(tmp_path):
    ds = make_dataset(tmp_path)
    s = ds[(4, 2, True)]
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, IMG, IMG)
    assert s["meta"].dtype == torch.float32 and s["meta"].tolist() == [20.0, 21.0, 22.0, 23.0, 24.0]
    assert s["meta_valid"].dtype == torch.bool and s["meta_valid"].tolist() == [True, True]
    assert s["targets"]["taxa_L10"].dtype == torch.int64 and int(s["targets"]["taxa_L10"]) == 0
    assert int(ds[2]["targets"]["taxa_L10"]) == 1 and int(ds[3]["targets"]["taxa_L10"]) == -1
    assert s["row"].dtype == torch.int64 and int(s["row"]) == 47
    assert bool(s["is_pad"]) and bool(s["image_ok"])
    # Same (index, epoch) -> same crop; another epoch -> another crop.
    assert torch.equal(ds[(4, 2, False)]["image"], s["image"])
    assert not torch.equal(ds[(4, 3, False)]["image"], s["image"])
    # Validation ignores the epoch.
    (tmp_path / "val").mkdir()
    val = make_dataset(tmp_path / "val", train=False)
    assert torch.equal(val[(4, 0, False)]["image"], val[(4, 9, False)]["image"])
    with pytest.raises(IndexError):
        ds[N]


def test_missing_image_strict_names_file_and_row(tmp_path):
    ds = make_dataset(tmp_path, broken=5)
    with pytest.raises(DataError) as err:
        ds[5]
    msg = str(err.value)
    assert "img_005.jpg" in msg and "labels.h5 row 57" in msg and "ALLOW_MISSING_IMAGES" in msg and "\n" not in msg


def test_missing_image_allowed_gives_placeholder_and_flag(tmp_path):
    ds = make_dataset(tmp_path, allow_missing=True, broken=5)
    s = ds[5]
    assert not bool(s["image_ok"]) and (s["image"] == PLACEHOLDER_VALUE).all()
    assert ds.missing_count == 1
    loader, _ = build_loader(ds, batch_size=4, num_workers=0, shuffle=False, seed=0, drop_last=False)
    bad = sum(int((~b["image_ok"]).sum()) for b in loader)
    assert bad == 1


def test_worker_error_is_unwrapped_to_one_line(tmp_path):
    ds = make_dataset(tmp_path, broken=0)
    loader, _ = build_loader(ds, batch_size=2, num_workers=1, shuffle=False, seed=0, drop_last=False)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    clean = unwrap_worker_error(err.value)
    assert isinstance(clean, DataError)
    assert str(clean).startswith("image ") and "img_000.jpg (labels.h5 row 7)" in str(clean)
    assert "Traceback" not in str(clean)


class _Failing(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        raise DataError(f"image at row {i}: not an image")


def _exit_with_a_worker_left_running() -> None:
    """A process whose loader iterator stays referenced by a kept exception's traceback when it exits."""
    kept = []
    loader, _ = build_loader(_Failing(), batch_size=2, num_workers=2, shuffle=False, seed=0, drop_last=False)
    try:
        next(iter(loader))
    except DataError as err:
        kept.append(err)  # frames, and the iterator with its live workers, stay reachable until exit


def test_a_process_exits_even_when_a_loader_is_never_shut_down() -> None:
    """Loader workers ignore SIGTERM (preemption), which multiprocessing's exit handler relies on to end them; a
    process holding an erroring loader must still exit instead of waiting for its workers forever."""
    import subprocess
    import sys

    code = "import test_dataset_loader as t; t._exit_with_a_worker_left_running(); print('done')"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]
    assert "Exception ignored" not in proc.stderr and "killed by signal" not in proc.stderr, proc.stderr[-2000:]


class _WhoRuns(torch.utils.data.Dataset):
    """Each sample: (pid, parent pid) of the process that produced it."""

    collate_fn = staticmethod(torch.utils.data.default_collate)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([os.getpid(), os.getppid()])


def test_workers_are_not_forked_from_the_training_process_and_outlive_stop_signals() -> None:
    """Forking the training process itself can deadlock the child (gloo/NCCL threads take CPython's thread-state
    lock; see ``worker_context``): workers come from a forkserver. A preemption signal sent to every process of the
    job (SLURM) must leave that server and its workers running until the rank has checkpointed."""
    loader, sampler = build_loader(_WhoRuns(), batch_size=2, num_workers=2, shuffle=False, seed=0, drop_last=False)
    first = torch.cat(_epoch(loader, sampler, epoch=0))
    workers, servers = set(first[:, 0].tolist()), set(first[:, 1].tolist())
    assert os.getpid() not in workers and servers.isdisjoint({os.getpid()}), (os.getpid(), first.tolist())

    it = iter(loader)
    live = set(torch.cat([next(it)]).flatten().tolist()) - servers  # this epoch's first worker
    for pid in live | servers:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    rest = list(it)  # the epoch finishes with the same workers
    assert len(rest) == 1
    # The same server forks the next epoch's workers (a dead one would have been replaced by a new one).
    assert set(torch.cat(_epoch(loader, sampler, epoch=1))[:, 1].tolist()) == servers


def _persistent_epochs_around(ds, change) -> tuple[list, list]:
    """Two epochs from the same two persistent workers, with ``change()`` applied in this process between them."""
    loader, sampler = build_loader(
        ds, batch_size=5, num_workers=2, shuffle=False, seed=0, drop_last=False, persistent_workers=True
    )
    before = _epoch(loader, sampler, epoch=0)
    change()
    return before, _epoch(loader, sampler, epoch=1)


def test_workers_share_the_dataset_arrays_instead_of_copying_them(tmp_path, monkeypatch):
    """Workers get the dataset pickled (forkserver); its arrays reach them as shared memory, so 64 workers do not
    hold 64 copies of the sample table. Seen from outside: a change made here shows in running workers."""
    monkeypatch.setattr(worker_share, "MIN_SHARED_BYTES", 0)  # share even the tiny test table
    ds = make_dataset(tmp_path)
    reference = _epoch(*build_loader(ds, batch_size=5, num_workers=0, shuffle=False, seed=0, drop_last=False), 0)

    def change():
        ds.meta[:] = 7.0

    before, after = _persistent_epochs_around(ds, change)
    _assert_same_batches(reference, before)  # the paths (blob + offsets), rows, targets and metadata all arrived
    assert all(bool((b["meta"] == 7.0).all()) for b in after), after[0]["meta"]
    assert isinstance(ds.meta.base, torch.Tensor) and ds.meta.base.is_shared()


def test_without_room_in_dev_shm_workers_get_copies_and_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(worker_share, "MIN_SHARED_BYTES", 0)
    monkeypatch.setattr(worker_share, "shm_free_bytes", lambda: 0)
    monkeypatch.setattr(worker_share, "_warned_no_room", False)
    ds = make_dataset(tmp_path)
    original = ds.meta.copy()

    def change():
        ds.meta[:] = 7.0

    with caplog.at_level("WARNING", logger="linnaeus.data.worker_share"):
        _, after = _persistent_epochs_around(ds, change)
    # the workers kept their own copies: the change made here does not show in them
    assert all(torch.equal(b["meta"], torch.from_numpy(original[i * 5 : i * 5 + 5])) for i, b in enumerate(after))
    assert sum("by copy" in r.getMessage() for r in caplog.records) == 1, caplog.text
    assert "--shm-size" in caplog.text


def _epoch(loader, sampler, epoch):
    sampler.set_epoch(epoch)
    return list(loader)


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in ("image", "meta", "meta_valid", "row", "is_pad", "image_ok"):
            assert torch.equal(x[key], y[key]), key
        for k in x["targets"]:
            assert torch.equal(x["targets"][k], y["targets"][k])


def test_batches_identical_with_0_1_2_workers_and_any_start_method(tmp_path):
    ds = make_dataset(tmp_path)
    results = {}
    for workers, ctx in [(0, None), (1, None), (2, None), (1, "spawn"), (1, "fork")]:
        loader, sampler = build_loader(
            ds, batch_size=4, num_workers=workers, shuffle=True, seed=11, drop_last=True, multiprocessing_context=ctx
        )
        results[(workers, ctx)] = _epoch(loader, sampler, epoch=1)
    ref = results[(0, None)]
    assert len(ref) == 2 and ref[0]["image"].shape == (4, 3, IMG, IMG)
    assert isinstance(ref[0]["targets"], dict) and ref[0]["targets"]["taxa_L20"].dtype == torch.int64
    for batches in results.values():
        _assert_same_batches(ref, batches)


def test_loader_leaves_global_torch_rng_alone(tmp_path):
    ds = make_dataset(tmp_path)
    loader, sampler = build_loader(ds, batch_size=5, num_workers=0, shuffle=True, seed=0, drop_last=True)
    state = torch.get_rng_state()
    _epoch(loader, sampler, 0)
    assert torch.equal(state, torch.get_rng_state())


def test_train_sampler_equal_disjoint_ranks_and_reshuffles():
    n, world = 10, 3
    lists = [EpochSampler(n, num_replicas=world, rank=r, seed=5, drop_last=True) for r in range(world)]
    keys = [list(s) for s in lists]
    assert [len(k) for k in keys] == [3, 3, 3] == [len(s) for s in lists]
    flat = [k[0] for ks in keys for k in ks]
    assert len(set(flat)) == 9 and not any(k[2] for ks in keys for k in ks)
    assert all(k[1] == 0 for ks in keys for k in ks)
    for s in lists:
        s.set_epoch(1)
    assert [k[0] for k in lists[0]] != [k[0] for k in keys[0]]  # a new order each epoch
    assert {k[1] for k in lists[0]} == {1}


def test_val_sampler_pads_with_flagged_repeats():
    n, world = 10, 4
    samplers = [EpochSampler(n, num_replicas=world, rank=r, shuffle=False, drop_last=False, pad=True) for r in range(4)]
    keys = [list(s) for s in samplers]
    assert [len(k) for k in keys] == [3, 3, 3, 3]
    real = sorted(k[0] for ks in keys for k in ks if not k[2])
    pads = [k for ks in keys for k in ks if k[2]]
    assert real == list(range(n)) and len(pads) == 2
    assert sorted(k[0] for k in pads) == [0, 1]  # repeats from the start of the order
    # More ranks than samples: still equal lengths, mostly padding.
    tiny = [list(EpochSampler(2, num_replicas=3, rank=r, shuffle=False, drop_last=False, pad=True)) for r in range(3)]
    assert [len(t) for t in tiny] == [1, 1, 1] and [t[0][2] for t in tiny] == [False, False, True]


@pytest.mark.parametrize(
    ("n", "world", "bs", "drop_last", "pad"),
    [(10, 1, 4, True, False), (10, 1, 4, False, False), (23, 2, 4, True, False), (23, 3, 4, False, True)],
)
def test_every_rank_gets_the_same_number_of_batches(tmp_path, n, world, bs, drop_last, pad):
    class Tiny(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, key):
            return {"row": torch.tensor(key[0]), "is_pad": torch.tensor(key[2])}

    expected = loader_num_batches(n, batch_size=bs, num_replicas=world, drop_last=drop_last, pad=pad)
    seen = []
    for rank in range(world):
        loader, _ = build_loader(
            Tiny(),
            batch_size=bs,
            num_workers=0,
            shuffle=True,
            seed=1,
            num_replicas=world,
            rank=rank,
            drop_last=drop_last,
            pad=pad,
        )
        batches = list(loader)
        assert len(batches) == len(loader) == expected
        seen += [int(r) for b in batches for r, p in zip(b["row"], b["is_pad"], strict=True) if not p]
    if pad or (world == 1 and not drop_last):
        assert sorted(seen) == list(range(n))  # validation sees every sample exactly once
    else:
        assert len(set(seen)) == len(seen)


def test_mid_epoch_resume_yields_exactly_the_rest():
    full = EpochSampler(50, num_replicas=2, rank=1, seed=9, batch_size=4)
    full.set_epoch(3)
    everything = list(full)
    assert len(everything) == 25
    # Consume 2 batches, save, resume in a fresh sampler, consume 1 more, save again, resume again.
    state = full.state_dict(batches_done=2)
    assert state["epoch"] == 3 and state["start_sample"] == 8
    second = EpochSampler(50, num_replicas=2, rank=1, seed=9, batch_size=4)
    second.load_state_dict(state)
    rest = list(second)
    assert len(second) == 17 and rest == everything[8:]
    third = EpochSampler(50, num_replicas=2, rank=1, seed=9, batch_size=4)
    third.load_state_dict(second.state_dict(batches_done=1))
    assert list(third) == everything[12:]
    assert everything[:8] + rest == everything  # nothing skipped, nothing repeated
    # The next epoch starts from its beginning again.
    third.set_epoch(4)
    assert len(list(third)) == 25
    with pytest.raises(ValueError, match="num_replicas"):
        EpochSampler(50, num_replicas=1, seed=9).load_state_dict(state)


def test_resumed_loader_yields_remaining_batches(tmp_path):
    ds = make_dataset(tmp_path)
    loader, sampler = build_loader(ds, batch_size=3, num_workers=0, shuffle=True, seed=4, drop_last=True)
    full = _epoch(loader, sampler, 2)
    assert len(full) == 3
    sampler.set_epoch(2, start_batch=1)
    assert len(loader) == 2
    _assert_same_batches(full[1:], list(loader))


def test_sampler_rejects_inconsistent_modes():
    with pytest.raises(ValueError, match="drop_last"):
        EpochSampler(10, num_replicas=2, drop_last=False, pad=False)
    with pytest.raises(ValueError, match="not both"):
        EpochSampler(10, drop_last=True, pad=True)
