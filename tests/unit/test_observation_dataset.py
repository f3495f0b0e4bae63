"""Multi-view samples (DATA.OBSERVATIONS): one observation, up to K photos, a view mask, metadata once."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import TEMPORAL_COLUMNS, write_labels_h5, write_tiny_dataset
from fake_runs import TINY_MODEL

from linnaeus.config.resolve_data import data_spec
from linnaeus.data.encoded import collate_samples
from linnaeus.data.loader import build_loader
from linnaeus.data.observation_dataset import ObservationDataset, group_positions
from linnaeus.data.prepare import prepare_data
from linnaeus.errors import ConfigError, DataError


def _dataset(root, ids=None):
    """The tiny dataset (24 rows, 40 px JPEGs) with ``observation_ids`` (default: 1, 2 or 3 rows each)."""
    ds = write_tiny_dataset(root)
    with h5py.File(ds.labels_path) as f:
        data = {
            k: (f[k].asstr()[()] if k == "img_identifiers" else f[k][()]) for k in f if isinstance(f[k], h5py.Dataset)
        }
    n = len(data["img_identifiers"])
    sizes = np.resize([1, 2, 3], n)  # observation j has sizes[j] rows, consecutive
    data["observation_ids"] = np.repeat(np.arange(n) * 5 + 2, sizes)[:n] if ids is None else ids(n)
    write_labels_h5(ds.labels_path, data, attrs={"temporal": {"column_names": TEMPORAL_COLUMNS}})
    return ds


OPTS = ("DATA.IMG_SIZE", "32", "MODEL.IMG_SIZE", "32", "DATA.OBSERVATIONS.ENABLED", "true")


def test_group_positions() -> None:
    starts, members = group_positions(np.array([5, 3, 5, 9, 3, 5]))
    assert starts.tolist() == [0, 3, 5, 6]
    assert members.tolist() == [0, 2, 5, 1, 4, 3]


@pytest.mark.parametrize("select", ["first", "random"])
def test_samples_are_observations_with_a_view_mask(tmp_path, select) -> None:
    ds = _dataset(tmp_path / "d")
    spec = data_spec(ds.config(*OPTS, "DATA.OBSERVATIONS.VIEWS", "2", "DATA.OBSERVATIONS.SELECT", select))
    data = prepare_data(spec)
    store = data.train.store
    obs = store.observation_ids
    for split, train in (("train", True), ("val", False)):
        rows = data.view(split).rows
        dataset = data.dataset(split, train=train)
        assert isinstance(dataset, ObservationDataset) and len(dataset) == len(set(obs[rows]))
        seen = set()
        for i in range(len(dataset)):
            item = dataset[(i, 0, False)]
            assert item["image"].shape == (2, 3, 32, 32) and item["image"].dtype == torch.uint8
            mask, view_rows = item["view_mask"].numpy(), item["view_rows"].numpy()
            used = view_rows[mask]
            assert mask[0] and len(set(obs[used])) == 1 and (view_rows[~mask] == -1).all()
            assert not item["image"][~item["view_mask"]].any()  # empty slots are zeros
            members = rows[obs[rows] == obs[used[0]]]
            assert mask.sum() == min(2, len(members)) and set(used) <= set(members)
            if select == "first" or not train:
                assert used.tolist() == members[:2].tolist()
            np.testing.assert_array_equal(item["meta"].numpy(), store.meta[members[0]])
            assert int(item["row"]) == members[0]
            seen.add(obs[used[0]])
        assert len(seen) == len(dataset)
    loader, _ = build_loader(data.dataset("train", train=True), batch_size=3, num_workers=0, shuffle=True, seed=1)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 2, 3, 32, 32) and batch["view_mask"].shape == (3, 2)
    assert batch["image_ok"].shape == (3, 2) and batch["meta"].shape[0] == 3


def test_random_views_change_with_the_epoch_and_repeat_with_the_seed(tmp_path) -> None:
    ds = _dataset(tmp_path / "r", ids=lambda n: np.repeat(np.arange(n // 6), 6)[:n])  # 6 photos each
    spec = data_spec(ds.config(*OPTS, "DATA.OBSERVATIONS.VIEWS", "2", "DATA.H5.SPLIT_BY", "row"))
    dataset = prepare_data(spec).dataset("train", train=True)
    picks = {e: [tuple(dataset[(i, e, False)]["view_rows"].tolist()) for i in range(len(dataset))] for e in range(4)}
    assert picks[0] == [tuple(dataset[(i, 0, False)]["view_rows"].tolist()) for i in range(len(dataset))]
    assert len({tuple(p) for p in picks.values()}) > 1


@pytest.mark.parametrize("decode", ["cpu", "worker"])
def test_one_view_per_observation_is_image_training(tmp_path, decode) -> None:
    ds = _dataset(tmp_path / "one", ids=lambda n: np.arange(n) * 3 + 1)
    image = prepare_data(data_spec(ds.config(*OPTS[:4])))
    multi = prepare_data(data_spec(ds.config(*OPTS, "DATA.OBSERVATIONS.VIEWS", "1")))
    np.testing.assert_array_equal(image.train.rows, multi.train.rows)
    a, b = image.dataset("train", train=True, decode=decode), multi.dataset("train", train=True, decode=decode)
    keys = [(i, 2, False) for i in range(len(a))]
    x, y = a.collate_fn([a[k] for k in keys]), b.collate_fn([b[k] for k in keys])
    assert y["image"].shape == (len(keys), 1, 3, 32, 32)
    assert torch.equal(x["image"], y["image"][:, 0]) and y["view_mask"].all()
    for key in ("meta", "meta_valid", "row", "is_pad"):
        assert torch.equal(x[key], y[key]), key
    assert all(torch.equal(x["targets"][k], y["targets"][k]) for k in x["targets"])


def test_device_decode_shapes_views_back(tmp_path) -> None:
    from linnaeus.data.device_decode import DeviceDecoder

    ds = _dataset(tmp_path / "dev")
    data = prepare_data(data_spec(ds.config(*OPTS, "DATA.OBSERVATIONS.VIEWS", "3")))
    cpu, dev = data.dataset("val", train=False, decode="cpu"), data.dataset("val", train=False, decode="device")
    keys = [(i, 0, False) for i in range(len(cpu))]
    planned = collate_samples([dev[k] for k in keys])
    decoded = DeviceDecoder().decode(planned, "cpu")
    plain = collate_samples([cpu[k] for k in keys])
    assert decoded["image"].shape == plain["image"].shape == (len(keys), 3, 3, 32, 32)
    diff = (decoded["image"].float() - plain["image"].float()).abs()
    assert diff.mean() < 2.0 and not decoded["image"][~plain["view_mask"]].any()


def test_refusals_are_one_line(tmp_path) -> None:
    plain = write_tiny_dataset(tmp_path / "plain")
    with pytest.raises(DataError, match=r"^DATA.OBSERVATIONS.ENABLED needs dataset 'observation_ids'") as err:
        prepare_data(data_spec(plain.config(*OPTS)))
    assert "\n" not in str(err.value)
    ds = _dataset(tmp_path / "s")
    with pytest.raises(ConfigError, match=r"DATA.OBSERVATIONS.ENABLED and DATA.SHARDS.ENABLED: shards hold one"):
        prepare_data(data_spec(ds.config(*OPTS, "DATA.SHARDS.ENABLED", "true", "DATA.SHARDS.DIR", str(tmp_path))))


def test_mixing_is_refused_with_observations(tmp_path) -> None:
    ds = _dataset(tmp_path / "m")
    for algo in ("MIXUP", "CUTMIX"):
        with pytest.raises(ConfigError, match=r"^SCHEDULE.MIX \(from --opts\): Mixup/CutMix mix single images") as err:
            ds.config(*OPTS, f"SCHEDULE.MIX.{algo}.ENABLED", "true")
        assert "\n" not in str(err.value)
        assert ds.config(*OPTS[:4], f"SCHEDULE.MIX.{algo}.ENABLED", "true")  # image training mixes as before


def test_training_throughput_counts_photos_not_observations(tmp_path) -> None:
    """images/s of a multi-view run counts the views present in each step's batches (counted on the host)."""
    from benchmarks.trainer_overhead import quiet_trainer
    from linnaeus.engine.trainer import Trainer
    from linnaeus.engine.windows import accumulation_windows

    ds = _dataset(tmp_path / "t")
    opts = ("DATA.OBSERVATIONS.VIEWS", "3", "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0", "TRAIN.MAX_STEPS", "50")
    with quiet_trainer():
        trainer = Trainer(ds.config(*OPTS, *opts, *TINY_MODEL[4:]))
        trainer.setup()
        trainer._begin()
        windows = accumulation_windows(trainer.train_batches, trainer.plan, start_step=trainer.step)
        photos = samples = 0
        for _ in range(3):
            window = next(windows)
            photos += sum(int(b["view_mask"].sum()) for b in window)
            samples += sum(len(b["view_mask"]) for b in window)
            trainer.train_step(window)
    assert samples < photos < 3 * samples  # observations of 1, 2 and 3 photos
    assert trainer.meter.counters.images == photos
    assert trainer.meter.losses.images == photos  # the logged window's images/s divides this by its seconds
