"""Device decode (DATA.DECODE device) on the CPU: same crops as the CPU path, Pillow-exact resampling, fallbacks.

Measured pixel error of device decode against the CPU path on photo-like JPEGs (uint8 levels, 0-255):

- against ``load_image(..., draft=False)`` (same full-resolution pixels): max 1, mean < 0.01 (rounding only);
- against the CPU path as it trains (reduced-size ``draft`` decode whenever a 1/2-scale decode still covers the
  crop): max ~15-20, mean ~0.4-0.7; the DCT-domain downscale and a filtered full-resolution downscale differ at
  sharp edges. The bounds asserted below are max 32, mean 1.5.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.common import synth_images
from linnaeus.data.dataset import PLACEHOLDER_VALUE, FileDataset
from linnaeus.data.device_decode import (
    DeviceDecoder,
    banded_resize_boxes,
    orient,
    resize_box,
    resize_boxes,
    resolve_decode_mode,
)
from linnaeus.data.encoded import encode_image, encoded_batch, is_encoded
from linnaeus.data.images import _TRANSPOSE, load_image
from linnaeus.data.loader import build_loader
from linnaeus.data.samples import SampleTable
from linnaeus.errors import ConfigError, DataError

IMG = 48
N = 12


def _write_photos(folder: Path, count: int = N, size: tuple[int, int] = (320, 240)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(synth_images(count, size, seed=5)):
        path = folder / f"photo_{i:03d}.jpg"
        path.write_bytes(data)
        paths.append(str(path))
    return paths


def _dataset(paths: list[str], *, train: bool, decode: str, allow_missing: bool = False) -> FileDataset:
    n = len(paths)
    table = SampleTable(
        np.arange(n, dtype=np.int64) * 10 + 3,
        {"taxa_L10": np.arange(n) % 3},
        np.zeros((n, 2), np.float32),
        np.ones((n, 1), bool),
        paths,
    )
    return FileDataset(table, img_size=IMG, train=train, seed=11, decode=decode, allow_missing=allow_missing)


def _batch_images(ds: FileDataset, keys: list[tuple[int, int, bool]], decoder: DeviceDecoder) -> torch.Tensor:
    from linnaeus.data.encoded import collate_samples

    batch = collate_samples([ds[k] for k in keys])
    return decoder.decode(batch, "cpu")["image"]


def _errors(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    diff = (a.int() - b.int()).abs()
    return int(diff.max()), float(diff.float().mean())


def test_resize_box_matches_pillow_bilinear_on_fractional_boxes():
    arr = np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8)
    image = torch.from_numpy(arr.transpose(2, 0, 1).copy())
    pil = Image.fromarray(arr)
    for box, size in [
        ((3.3, 5.7, 120.2, 90.1), 32),
        ((0, 0, 131, 97), 64),
        ((10, 10, 30, 40), 50),
        ((0.5, 0, 131, 96.5), 200),
    ]:
        ref = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None))
        out = resize_box(image, box, size)
        assert out.dtype == torch.uint8 and out.shape == (3, size, size)
        worst, mean = _errors(out, torch.from_numpy(ref.transpose(2, 0, 1).copy()))
        assert worst <= 1 and mean < 0.15, (box, size, worst, mean)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillow_exif_transpose(orientation):
    arr = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    pil = Image.fromarray(arr)
    ref = np.asarray(pil.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else pil)
    out = orient(torch.from_numpy(arr.transpose(2, 0, 1).copy()), orientation)
    assert np.array_equal(out.numpy().transpose(1, 2, 0), ref)


@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_device_batch_agrees_with_cpu_batch(tmp_path, train):
    paths = _write_photos(tmp_path / "img")
    cpu_ds = _dataset(paths, train=train, decode="cpu")
    dev_ds = _dataset(paths, train=train, decode="device")
    keys = [(i, 4, False) for i in range(N)]
    decoder = DeviceDecoder()
    device = _batch_images(dev_ds, keys, decoder)
    cpu = torch.stack([cpu_ds[k]["image"] for k in keys])
    assert device.shape == cpu.shape == (N, 3, IMG, IMG) and device.dtype == torch.uint8
    assert decoder.decoded == N and decoder.fallbacks == 0
    # Same crop boxes: identical to Pillow on the same full-resolution pixels, up to one level of rounding.
    full = torch.stack(
        [
            torch.from_numpy(
                load_image(p, img_size=IMG, train=train, rng=_rng(11, 4, i) if train else None, draft=False)
            )
            for i, p in enumerate(paths)
        ]
    )
    worst, mean = _errors(device, full)
    assert worst <= 1 and mean < 0.02, (worst, mean)  # 0 where both decoders give the same pixels (CPU resize)
    # Against the CPU path as it trains (reduced-size JPEG decode): small, stated error (module docstring).
    worst, mean = _errors(device, cpu)
    assert worst <= 32 and mean < 1.5, (worst, mean)
    # Another epoch draws other crops in training; validation ignores the epoch.
    other = _batch_images(dev_ds, [(i, 5, False) for i in range(N)], DeviceDecoder())
    assert torch.equal(other, device) is (not train)


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    from linnaeus.data.dataset import sample_rng

    return sample_rng(seed, epoch, index)


def _cmyk_jpeg(path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (60, 80, 4), dtype=np.uint8)
    Image.fromarray(arr, "CMYK").save(path, format="JPEG", quality=90)


def test_png_and_cmyk_fall_back_to_cpu_decode_and_are_counted(tmp_path):
    paths = _write_photos(tmp_path / "img", count=4, size=(120, 90))
    png = tmp_path / "img" / "plain.png"
    Image.open(paths[0]).convert("RGB").save(png)
    cmyk = tmp_path / "img" / "cmyk.jpg"
    _cmyk_jpeg(cmyk)
    assert Image.open(cmyk).mode == "CMYK"
    all_paths = [*paths, str(png), str(cmyk)]
    keys = [(i, 2, False) for i in range(len(all_paths))]
    decoder = DeviceDecoder()
    device = _batch_images(_dataset(all_paths, train=True, decode="device"), keys, decoder)
    cpu = torch.stack([_dataset(all_paths, train=True, decode="cpu")[k]["image"] for k in keys])
    assert decoder.fallbacks == 2 and decoder.decoded == 4
    assert decoder.counts() == {"decoded_on_device": 4, "decode_fallbacks": 2}
    # Fallbacks run the CPU path itself with the planned box: bit-identical.
    assert torch.equal(device[4:], cpu[4:])
    assert _errors(device[:4], cpu[:4])[0] <= 32


def test_grayscale_jpeg_is_decoded_on_device_as_rgb(tmp_path):
    gray = tmp_path / "gray.jpg"
    arr = (np.add.outer(np.arange(70), np.arange(90)) * 1.3 % 256).astype(np.uint8)
    Image.fromarray(arr, "L").save(gray, format="JPEG", quality=90)
    ds = _dataset([str(gray)] * 2, train=True, decode="device")
    decoder = DeviceDecoder()
    out = _batch_images(ds, [(0, 0, False), (1, 0, False)], decoder)
    assert decoder.decoded == 2 and decoder.fallbacks == 0
    assert out.shape == (2, 3, IMG, IMG)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    cpu = torch.stack([_dataset([str(gray)] * 2, train=True, decode="cpu")[(i, 0, False)]["image"] for i in range(2)])
    assert _errors(out, cpu)[0] <= 32


def test_exif_orientation_is_applied_before_the_crop(tmp_path):
    arr = np.asarray(Image.open(io.BytesIO(synth_images(1, (160, 100), seed=2)[0])).convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, format="JPEG", quality=92, exif=exif.tobytes())
    item = encode_image(str(path), img_size=IMG, train=False, rng=None)
    assert item.orientation == 6 and item.data is not None
    decoder = DeviceDecoder()
    out = decoder.decode(encoded_batch([item]), "cpu")["image"][0]
    ref = torch.from_numpy(load_image(str(path), img_size=IMG, train=False, rng=None, draft=False))
    assert _errors(out, ref)[0] <= 1


def test_missing_image_placeholder_in_device_mode(tmp_path):
    paths = _write_photos(tmp_path / "img", count=3, size=(100, 80))
    Path(paths[1]).unlink()
    strict = _dataset(paths, train=True, decode="device")
    with pytest.raises(DataError, match=r"photo_001\.jpg \(labels.h5 row 13\): file not found"):
        strict[1]
    lenient = _dataset(paths, train=True, decode="device", allow_missing=True)
    from linnaeus.data.encoded import collate_samples

    batch = collate_samples([lenient[(i, 0, False)] for i in range(3)])
    assert is_encoded(batch) and batch["image_ok"].tolist() == [True, False, True]
    decoder = DeviceDecoder()
    out = decoder.decode(batch, "cpu")
    assert not is_encoded(out) and "image_bytes" not in out
    assert bool((out["image"][1] == PLACEHOLDER_VALUE).all())
    assert decoder.fallbacks == 0 and decoder.decoded == 2  # a placeholder is a missing image, not a fallback


def test_undecodable_jpeg_body_falls_back_and_is_reported(tmp_path):
    paths = _write_photos(tmp_path / "img", count=2, size=(100, 80))
    data = Path(paths[0]).read_bytes()
    # A valid header followed by garbage: the worker plans it (header reads fine), the decoders reject it.
    broken = data[: data.index(b"\xff\xda")] + b"\xff\xda" + b"\x00" * 5 + b"\xff\xd9"
    Path(paths[0]).write_bytes(broken)
    from linnaeus.data.encoded import collate_samples

    ds = _dataset(paths, train=True, decode="device")
    batch = collate_samples([ds[(i, 0, False)] for i in range(2)])
    decoder = DeviceDecoder()
    with pytest.raises(DataError, match=r"image at labels.h5 row 3: cannot decode"):
        decoder.decode(batch, "cpu")
    lenient = DeviceDecoder(allow_missing=True)
    out = lenient.decode(batch, "cpu")
    assert out["image_ok"].tolist() == [False, True] and lenient.fallbacks == 1 and lenient.missing == 1
    assert bool((out["image"][0] == PLACEHOLDER_VALUE).all())


def test_decoded_batches_pass_through_unchanged():
    batch = {"image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "row": torch.tensor([1, 2])}
    assert DeviceDecoder().decode(batch, "cpu") is batch


@pytest.mark.parametrize("workers", [0, 2])
def test_device_mode_batches_do_not_depend_on_worker_count(tmp_path, workers):
    paths = _write_photos(tmp_path / "img", count=8, size=(120, 90))
    reference = None
    for count in (0, workers):
        ds = _dataset(paths, train=True, decode="device")
        loader, sampler = build_loader(ds, batch_size=4, num_workers=count, shuffle=True, seed=5)
        sampler.set_epoch(3)
        decoder = DeviceDecoder()
        batches = [decoder.decode(b, "cpu") for b in loader]
        images = torch.cat([b["image"] for b in batches])
        rows = torch.cat([b["row"] for b in batches])
        if reference is None:
            reference = (images, rows)
        else:
            assert torch.equal(rows, reference[1]) and torch.equal(images, reference[0])
        assert decoder.decoded == 8


def test_resolve_decode_mode_and_config_key(tiny_dataset):
    # Where the decode happens: the main process on a GPU, the loader workers when training on the CPU.
    assert resolve_decode_mode("auto", "cuda:0") == "device"
    assert resolve_decode_mode("auto", "cpu") == "cpu"
    assert resolve_decode_mode("cpu", torch.device("cuda", 1)) == "cpu"
    assert resolve_decode_mode("device", "cuda:1") == "device"
    assert resolve_decode_mode("device", torch.device("cpu")) == "worker"
    assert resolve_decode_mode("device") == ("device" if torch.cuda.is_available() else "worker")
    with pytest.raises(ConfigError, match=r"DATA\.DECODE"):
        resolve_decode_mode("gpu", "cpu")
    assert tiny_dataset.config().DATA.DECODE == "auto"
    assert tiny_dataset.config("DATA.DECODE", "device").DATA.DECODE == "device"
    with pytest.raises(ConfigError, match="DECODE"):
        tiny_dataset.config("DATA.DECODE", "gpu")


def test_batched_resize_matches_per_image_resize():
    rng = np.random.default_rng(3)
    images, boxes = [], []
    for h, w in [(97, 131), (60, 45), (128, 128), (33, 200)]:
        images.append(torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)))
        x0, y0 = rng.uniform(0, w / 3), rng.uniform(0, h / 3)
        boxes.append((x0, y0, rng.uniform(x0 + 5, w), rng.uniform(y0 + 5, h)))
    single = torch.stack([resize_box(im, box, 40) for im, box in zip(images, boxes, strict=True)])
    for budget in (256 << 20, 1):  # one padded chunk, and one image per chunk
        batched = banded_resize_boxes(images, boxes, 40, budget_bytes=budget)  # what a GPU runs
        worst, mean = _errors(batched, single)
        assert worst <= 1 and mean < 0.01, (budget, worst, mean)
    # On the CPU the batch is resized by Pillow itself: exactly Pillow's RGB resize.
    for image, box, out in zip(images, boxes, resize_boxes(images, boxes, 40), strict=True):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        ref = np.asarray(pil.resize((40, 40), Image.Resampling.BILINEAR, box=box, reducing_gap=None))
        assert np.array_equal(out.numpy(), ref.transpose(2, 0, 1))


def test_reader_helpers_build_either_batch_format(tmp_path):
    from linnaeus.data.encoded import image_fields, read_image

    paths = _write_photos(tmp_path / "img", count=3, size=(100, 80))
    data = [Path(p).read_bytes() for p in paths]
    common = dict(img_size=IMG, train=True, rrc_scale=(0.35, 1.0), rrc_ratio=(0.75, 4 / 3))
    pixels = [read_image(d, decode="cpu", rng=_rng(1, 0, i), **common) for i, d in enumerate(data)]
    encoded = [read_image(d, decode="device", rng=_rng(1, 0, i), **common) for i, d in enumerate(data)]
    cpu = image_fields(pixels)
    assert set(cpu) == {"image"} and cpu["image"].shape == (3, 3, IMG, IMG)
    dev = image_fields(encoded)
    assert is_encoded(dev) and dev["image_offsets"].tolist() == [0, *np.cumsum([len(d) for d in data]).tolist()]
    assert _errors(DeviceDecoder().decode(dev, "cpu")["image"], cpu["image"])[0] <= 32
    with pytest.raises(ValueError, match="decode must be"):
        read_image(data[0], decode="gpu", rng=None, **common)


def _mixed_paths(tmp_path: Path) -> list[str]:
    """Photos plus one PNG (a worker-side fallback) and one missing file (a placeholder when allowed)."""
    paths = _write_photos(tmp_path / "img", count=6, size=(150, 110))
    png = tmp_path / "img" / "plain.png"
    Image.open(paths[0]).convert("RGB").save(png)
    return [*paths[:3], str(png), str(tmp_path / "img" / "gone.jpg"), *paths[3:]]


def _epoch_batches(ds: FileDataset, workers: int) -> list[dict]:
    loader, sampler = build_loader(ds, batch_size=4, num_workers=workers, shuffle=True, seed=5)
    sampler.set_epoch(2)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_decode_equals_main_process_decode_bitwise_and_counts_arrive(tmp_path, workers):
    paths = _mixed_paths(tmp_path)
    main = DeviceDecoder()
    planned = _dataset(paths, train=True, decode="device", allow_missing=True)
    reference = [main.decode(b, "cpu") for b in _epoch_batches(planned, 0)]

    shipped = _epoch_batches(_dataset(paths, train=True, decode="worker", allow_missing=True), workers)
    assert all(not is_encoded(b) and b["decode_counts"].dtype == torch.int64 for b in shipped)
    receiver = DeviceDecoder()
    received = [receiver.decode(b, "cpu") for b in shipped]
    assert len(received) == len(reference) == 2
    for got, ref in zip(received, reference, strict=True):
        assert set(got) == set(ref) and "decode_counts" not in got
        assert torch.equal(got["row"], ref["row"]) and torch.equal(got["image_ok"], ref["image_ok"])
        assert torch.equal(got["image"], ref["image"])  # the same decoder on the same bytes: bit-identical
    # 6 photos decoded by the device path, the PNG fell back, the missing file is a placeholder (not a fallback).
    assert (receiver.decoded, receiver.fallbacks) == (6, 1)
    assert receiver.counts() == {"decoded_on_device": 6, "decode_fallbacks": 1}
    assert sum(int((~b["image_ok"]).sum()) for b in received) == 1


def test_worker_decode_reports_an_undecodable_image_in_one_line(tmp_path):
    from linnaeus.data.loader import unwrap_worker_error

    paths = _write_photos(tmp_path / "img", count=4, size=(100, 80))
    data = Path(paths[2]).read_bytes()
    Path(paths[2]).write_bytes(data[: data.index(b"\xff\xda")] + b"\xff\xda" + b"\x00" * 5 + b"\xff\xd9")
    loader, _ = build_loader(
        _dataset(paths, train=True, decode="worker"), batch_size=4, num_workers=1, shuffle=False, seed=0
    )
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    err = unwrap_worker_error(caught.value)
    assert str(err).startswith("image at labels.h5 row 23: cannot decode") and "\n" not in str(err)
    assert "ALLOW_MISSING_IMAGES" in str(err)
    lenient = _dataset(paths, train=True, decode="worker", allow_missing=True)
    batch = next(iter(build_loader(lenient, batch_size=4, num_workers=1, shuffle=False, seed=0)[0]))
    assert batch["image_ok"].tolist() == [True, True, False, True]
    assert batch["decode_counts"].tolist() == [3, 1, 1]  # decoded, fallbacks, missing
    assert bool((batch["image"][2] == PLACEHOLDER_VALUE).all())
