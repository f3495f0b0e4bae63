"""Image decoding: deterministic val crop, reduced-size (draft) decode fidelity, RRC, EXIF, colour modes, errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from linnaeus.data.images import ImageDecodeError, center_crop_box, load_image, random_resized_crop_box
from linnaeus.errors import DataError


def smooth_image(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Gradients plus mild noise: photo-like enough that JPEG and resampling behave realistically."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [255 * xx / w, 255 * yy / h, 127 + 100 * np.sin(xx / 37.0) * np.cos(yy / 23.0)],
        axis=-1,
    )
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def write_jpeg(path: Path, arr: np.ndarray, **kw) -> Path:
    Image.fromarray(arr).save(path, format="JPEG", quality=92, **kw)
    return path


def test_val_crop_is_deterministic_for_paths_and_bytes(tmp_path):
    p = write_jpeg(tmp_path / "a.jpg", smooth_image(640, 480))
    a = load_image(p, img_size=96, train=False, rng=None)
    b = load_image(str(p), img_size=96, train=False, rng=np.random.default_rng(5))  # rng is ignored for val
    c = load_image(p.read_bytes(), img_size=96, train=False, rng=None)
    assert a.dtype == np.uint8 and a.shape == (3, 96, 96) and a.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_center_crop_box_geometry():
    # 400x200, img 100, crop pct 0.5: shorter side 200 -> 200, centre 100 px square = source box of side 100.
    assert center_crop_box(400, 200, 100, 0.5) == (150.0, 50.0, 250.0, 150.0)
    assert center_crop_box(300, 300, 64, 1.0) == (0.0, 0.0, 300.0, 300.0)


def _spy_draft(monkeypatch) -> list:
    calls: list = []
    original = JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        calls.append((size, result))
        return result

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    return calls


def test_draft_decode_matches_full_decode(tmp_path, monkeypatch):
    p = write_jpeg(tmp_path / "big.jpg", smooth_image(1200, 900, seed=1))
    calls = _spy_draft(monkeypatch)
    fast = load_image(p, img_size=128, train=False, rng=None)
    # The decoder really ran at reduced size, and kept >= 128 px across the crop (787 px at full size).
    ((_, (_, box)),) = calls
    scale = 1200 / box[2]
    assert scale in (2.0, 4.0) and 787 / scale >= 128
    full = load_image(p, img_size=128, train=False, rng=None, draft=False)
    diff = np.abs(fast.astype(int) - full.astype(int))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8

    # Train crops: same geometry from the same rng with and without draft.
    t_fast = load_image(p, img_size=128, train=True, rng=np.random.default_rng(3))
    t_full = load_image(p, img_size=128, train=True, rng=np.random.default_rng(3), draft=False)
    assert np.abs(t_fast.astype(int) - t_full.astype(int)).mean() < 1.5


def test_small_rrc_crop_is_not_drafted_below_needed_resolution(tmp_path, monkeypatch):
    p = write_jpeg(tmp_path / "big.jpg", smooth_image(1200, 900, seed=2))
    calls = _spy_draft(monkeypatch)
    scales = []
    for seed in range(8):
        box = random_resized_crop_box(1200, 900, np.random.default_rng(seed), (0.05, 0.1), (0.75, 4 / 3))
        load_image(p, img_size=64, train=True, rng=np.random.default_rng(seed), rrc_scale=(0.05, 0.1))
        ((_, (_, drafted)),) = calls[-1:]
        scale = 1200 / drafted[2]
        scales.append(scale)
        # The small crop (about 230-330 px) still has >= 64 source pixels across after reduced decoding.
        assert min(box[2] - box[0], box[3] - box[1]) / scale >= 64
    assert len(calls) == 8 and max(scales) >= 2


def test_train_crop_uses_rng(tmp_path):
    p = write_jpeg(tmp_path / "a.jpg", smooth_image(300, 200))
    a = load_image(p, img_size=64, train=True, rng=np.random.default_rng(1))
    b = load_image(p, img_size=64, train=True, rng=np.random.default_rng(1))
    c = load_image(p, img_size=64, train=True, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_random_resized_crop_box_respects_scale_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(500, 375, rng, (0.35, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        frac = (right - left) * (bottom - top) / (500 * 375)
        assert 0.33 <= frac <= 1.0
    # Impossible ratio range for a very wide image: falls back to the largest centre crop at the max ratio.
    box = random_resized_crop_box(1000, 100, np.random.default_rng(0), (0.9, 1.0), (1.0, 1.0))
    assert box == (450, 0, 550, 100)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :100] = (220, 20, 20)  # left half red
    arr[:, 100:] = (20, 20, 220)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise: the left half ends up on top
    p = write_jpeg(tmp_path / "rot.jpg", arr, exif=exif)
    out = load_image(p, img_size=32, train=False, rng=None, val_crop_pct=1.0)
    top, bottom = out[:, 2, 16], out[:, -3, 16]
    assert top[0] > 150 and top[2] < 80  # red on top
    assert bottom[2] > 150 and bottom[0] < 80  # blue below


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA"])
def test_colour_modes_become_rgb(tmp_path, mode):
    rgb = Image.fromarray(smooth_image(120, 90, seed=3))
    im = rgb.convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    out = load_image(buf.getvalue(), img_size=48, train=False, rng=None)
    assert out.shape == (3, 48, 48) and out.dtype == np.uint8
    if mode in ("L", "LA"):
        np.testing.assert_array_equal(out[0], out[1])
        np.testing.assert_array_equal(out[1], out[2])
    else:
        ref = load_image(_png(rgb), img_size=48, train=False, rng=None)
        assert np.abs(out.astype(int) - ref.astype(int)).mean() < 25  # same picture, lossy modes aside


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_missing_and_corrupt_files_raise_named_errors(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"nope\.jpg: file not found"):
        load_image(tmp_path / "nope.jpg", img_size=32, train=False, rng=None)
    good = write_jpeg(tmp_path / "good.jpg", smooth_image(200, 150)).read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "text.jpg").write_text("not an image\nat all")
    for name in ("trunc.jpg", "text.jpg"):
        with pytest.raises(ImageDecodeError) as err:
            load_image(tmp_path / name, img_size=32, train=False, rng=None)
        assert isinstance(err.value, DataError)
        msg = str(err.value)
        assert str(tmp_path / name) in msg and "cannot decode" in msg and "\n" not in msg
