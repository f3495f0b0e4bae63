"""Wide image modes decode by their real range, oversized images are one line, and one unreadable image in a
`linnaeus predict` batch does not cost the others their output."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import linnaeus.data.images as images_mod
from linnaeus.data.images import ImageDecodeError, load_image


def _ramp16(w: int = 64, h: int = 48) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))


def test_16bit_png_ramp_decodes_like_its_8bit_copy(tmp_path: Path) -> None:
    ramp = _ramp16()
    Image.fromarray(ramp).save(tmp_path / "r16.png")
    with Image.open(tmp_path / "r16.png") as im:
        assert im.mode.startswith("I"), im.mode  # really a wide mode, not Pillow's own 8-bit reduction
    Image.fromarray((ramp / 257).round().astype(np.uint8)).save(tmp_path / "r8.png")
    wide = load_image(tmp_path / "r16.png", img_size=32, train=False, rng=None).astype(float)
    narrow = load_image(tmp_path / "r8.png", img_size=32, train=False, rng=None).astype(float)
    assert abs(wide.mean() - narrow.mean()) <= 2, (wide.mean(), narrow.mean())
    assert np.abs(wide - narrow).max() <= 2
    assert 100 < wide.mean() < 155  # a ramp averages mid-grey, not near-white


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32bit_integer_and_float_modes_scale_by_their_range(tmp_path: Path, mode: str) -> None:
    ramp = _ramp16()
    values = ramp.astype(np.int32) if mode == "I" else (ramp / 65535).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "x.tif")
    with Image.open(tmp_path / "x.tif") as im:
        assert im.mode == mode
    Image.fromarray((ramp / 257).round().astype(np.uint8)).save(tmp_path / "r8.png")
    wide = load_image(tmp_path / "x.tif", img_size=32, train=False, rng=None).astype(float)
    narrow = load_image(tmp_path / "r8.png", img_size=32, train=False, rng=None).astype(float)
    assert np.abs(wide - narrow).max() <= 2


def test_oversized_image_is_one_line_without_pillow_warning(tmp_path: Path, monkeypatch) -> None:
    Image.new("RGB", (300, 200), (10, 20, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 300 * 200 - 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 200 // 2 + 10)  # Pillow would warn at open
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping would fail the test
        with pytest.raises(ImageDecodeError, match=r"big.png: 300 x 200 = 60000 pixels is over the limit of 59999"):
            load_image(tmp_path / "big.png", img_size=32, train=False, rng=None)


def test_not_an_image_names_the_file_not_a_buffer(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(ImageDecodeError) as err:
        load_image(tmp_path / "x.jpg", img_size=32, train=False, rng=None)
    assert "x.jpg" in str(err.value) and "BytesIO" not in str(err.value) and "0x" not in str(err.value)


def test_predict_outputs_the_good_images_of_a_batch_with_a_bad_one(tmp_path: Path, capsys) -> None:
    from conftest import write_tiny_dataset
    from fake_runs import HEADS, TINY_MODEL, fake_run
    from typus import ClassificationResult

    from linnaeus.cli import main
    from linnaeus.inference.bundle import export_bundle

    ds = write_tiny_dataset(tmp_path / "data", per_species=2)
    fake_run(ds.config(*TINY_MODEL, *HEADS), tmp_path / "run")
    bundle = export_bundle(tmp_path / "run", tmp_path / "bundle", assume_encodings=True)
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = sorted(p for p in Path(ds.images_dir).rglob("*.jpg"))[:4]
    for i, p in enumerate(good):
        shutil.copy(p, folder / f"{i}_good.jpg")
    (folder / "2_bad.jpg").write_bytes(b"\xff\xd8 truncated")
    capsys.readouterr()
    code = main(["predict", "--bundle", str(bundle), str(folder), "--batch-size", "8", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code != 0
    ids = [
        ClassificationResult.model_validate_json(line).input_context.unit_ids[0] for line in captured.out.splitlines()
    ]
    assert [Path(i).name for i in ids] == ["0_good.jpg", "1_good.jpg", "2_good.jpg", "3_good.jpg"]
    errors = [ln for ln in captured.err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "2_bad.jpg" in errors[0], captured.err
