"""Worker-side image loading: read bytes, reduced-size JPEG decode, crop, resize, uint8 CHW.

This runs in DataLoader workers (and in the shard reader and the predictor), so it only uses Pillow and NumPy
and never returns floats: conversion, flips, colour and normalisation happen on the training device.

Crops are planned on the full-resolution, EXIF-oriented image first; only then is the JPEG decoder asked for
the smallest DCT scale (1/2, 1/4, 1/8) that still leaves at least ``img_size`` source pixels across the planned
crop (``Image.draft``). Decoding at 1/4 scale is several times faster than a full decode followed by a
downscale, and because the crop plan never depends on the draft, the output geometry is the same with or
without it; pixels differ only by the decoder's DCT-domain downscaling versus Pillow's filter.

Validation/inference (``train=False``): resize the shorter side to ``img_size / val_crop_pct`` and take the
centre ``img_size`` square, done as a single filtered resize of the corresponding source box. It uses no
randomness and depends only on the bytes and the arguments, so training-time validation and the predictor
produce bit-identical arrays.

Training (``train=True``): random-resized-crop as in torchvision (area fraction ``rrc_scale``, aspect ratio
log-uniform in ``rrc_ratio``, ten tries, then a centre crop clamped to the ratio range), drawn from ``rng``.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from linnaeus.errors import DataError

# EXIF orientation tag (0x0112) value → the transpose that displays the image upright (as ImageOps.exif_transpose).
_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Bilinear with Pillow's support scaling is an antialiased downscale; it is also what the crop is resized with in
# training, so train and val see the same kind of interpolation.
RESAMPLE = Image.Resampling.BILINEAR

Box = tuple[float, float, float, float]  # left, top, right, bottom in oriented full-resolution pixels
PLACEHOLDER_VALUE = 128  # mid-grey: after normalisation close to zero, so a placeholder carries little signal

# Images above this many pixels are refused with one line (Pillow's own decompression-bomb threshold, ~9459 x 9459):
# decoding one would take gigabytes per worker. Downscale such images before training or prediction.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Single-channel modes wider than 8 bits (16-bit PNG/TIFF greyscale, 32-bit integer and float); Pillow's
# convert("RGB") clips them to 0..255, which turns a 16-bit image almost white.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class ImageDecodeError(DataError):
    """An image file is missing, unreadable or not a decodable image. ``source`` names it, ``reason`` says why."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"image {source}: {reason}")


def _read(source: str | bytes | Path) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    return read_image_file(source), str(source)


def read_image_file(path: str | Path) -> bytes:
    """The bytes of a regular file. Anything else named like an image (a FIFO, a device, a socket) is refused
    before it is read: reading a FIFO nobody writes to would wait forever."""
    name = str(path)
    try:
        # O_NONBLOCK: opening a FIFO without a writer returns at once instead of waiting for one.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageDecodeError(name, "file not found") from None
    except OSError as err:
        raise ImageDecodeError(name, f"cannot read ({err.strerror or err})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageDecodeError(
                name, "not a regular file (a FIFO, device, socket or folder); expected an image file"
            )
        os.set_blocking(fd, True)
        try:
            return fh.read()
        except OSError as err:
            raise ImageDecodeError(name, f"cannot read ({err.strerror or err})") from None


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """torchvision's RandomResizedCrop.get_params with a NumPy generator: (left, top, right, bottom)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    # Fallback: the largest centre crop whose aspect ratio is inside the range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, img_size: int, val_crop_pct: float = 0.875) -> Box:
    """The source box that "resize shorter side to img_size/val_crop_pct, then centre-crop img_size" selects."""
    short = min(width, height)
    resized_short = img_size / val_crop_pct
    side = img_size * short / resized_short  # the crop's side in source pixels (= short * val_crop_pct)
    left = (width - side) / 2.0
    top = (height - side) / 2.0
    return left, top, left + side, top + side


def too_large(size: tuple[int, int] | None = None) -> str:
    what = f"{size[0]} x {size[1]} = {size[0] * size[1]} pixels is" if size else "its pixel count is"
    return f"{what} over the limit of {MAX_PIXELS} (linnaeus.data.images.MAX_PIXELS); downscale the image"


def _to_8bit(im: Image.Image) -> Image.Image:
    """A wide single-channel image as 8-bit "L", scaled by the range of its mode rather than clipped.

    Integer modes: 0..65535 (16-bit files; "I" is how Pillow holds 16-bit PNGs too) maps to 0..255. Float ("F"):
    0..1 when every value lies in it (the usual convention), else the image's own min..max.
    """
    values = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        finite = values[np.isfinite(values)]
        lo, hi = (
            (0.0, 1.0)
            if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1)
            else (finite.min(), finite.max())
        )
        values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
    else:
        lo, hi = 0.0, 65535.0
    scaled = (values - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def crop_box(
    width: int,
    height: int,
    *,
    img_size: int,
    train: bool,
    rng: np.random.Generator | None,
    rrc_scale: tuple[float, float] = (0.35, 1.0),
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    val_crop_pct: float = 0.875,
) -> Box:
    """The source box ``load_image`` takes from an oriented ``width`` x ``height`` image (the one geometry rule
    shared by the CPU decode and the device decode in ``linnaeus.data.encoded``)."""
    if train:
        return random_resized_crop_box(width, height, rng or np.random.default_rng(), rrc_scale, rrc_ratio)
    return center_crop_box(width, height, img_size, val_crop_pct)


def _fast_scaled_decode(im: Image.Image) -> None:
    """Let a scaled JPEG decode use libjpeg's fast IDCT and plain chroma upsampling (Pillow's own draft flag).

    At 1/2-1/8 scale Huffman decoding dominates, so the accurate settings cost ~15 % for differences of at most a
    few levels (mean < 1) in pixels that are then averaged down further. Only the (scale, draft) pair that
    ``Image.draft`` sets is touched; any other shape is left alone.
    """
    config = getattr(im, "decoderconfig", None)
    if isinstance(config, tuple) and len(config) == 2 and isinstance(config[0], int) and config[0] > 1:
        im.decoderconfig = (config[0], 1)


def _oriented_size(im: Image.Image, orientation: int) -> tuple[int, int]:
    w, h = im.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


@contextmanager
def decode_errors(name: str) -> Iterator[None]:
    """Pillow's many exception types → one ``ImageDecodeError`` line naming the file."""
    try:
        yield
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        # Pillow's message names its in-memory buffer (<_io.BytesIO object at 0x...>), not the file.
        raise ImageDecodeError(
            name, "cannot decode (not a recognised image format); expected a readable JPEG/PNG image"
        ) from None
    except Image.DecompressionBombError:
        raise ImageDecodeError(name, too_large()) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(name, f"cannot decode ({err}); expected a readable JPEG/PNG image") from None


def open_planned(
    data: bytes,
    name: str,
    *,
    img_size: int,
    train: bool,
    rng: np.random.Generator | None,
    rrc_scale: tuple[float, float],
    rrc_ratio: tuple[float, float],
    val_crop_pct: float,
    box: Box | None = None,
) -> tuple[Image.Image, int, Box]:
    """Open an image (header only; nothing decoded yet) and plan its crop: (image, EXIF orientation, crop box in
    oriented full-resolution pixels). The one place both decode paths (here and ``encoded.py``) size an image, so
    their crops agree. Call inside ``decode_errors``."""
    with warnings.catch_warnings():
        # Size is checked below with a one-line error; Pillow's own warning would print raw to stderr.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
    if im.size[0] * im.size[1] > MAX_PIXELS:
        raise ImageDecodeError(name, too_large(im.size))
    orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    if box is None:
        width, height = _oriented_size(im, orientation)
        box = crop_box(
            width,
            height,
            img_size=img_size,
            train=train,
            rng=rng,
            rrc_scale=rrc_scale,
            rrc_ratio=rrc_ratio,
            val_crop_pct=val_crop_pct,
        )
    return im, orientation, box


@contextmanager
def planned_image(source: str | bytes | Path, **plan: Any) -> Iterator[tuple[bytes, str, Image.Image, int, Box]]:
    """Read ``source`` and open it with its crop planned (``open_planned``'s keywords): (bytes, file name, image,
    EXIF orientation, crop box). Whatever the body does with the image fails as one ``ImageDecodeError`` naming the
    file. Both decode paths (``load_image`` here, ``encode_image`` in ``encoded.py``) start with this."""
    data, name = _read(source)
    with decode_errors(name):
        im, orientation, box = open_planned(data, name, **plan)
        yield data, name, im, orientation, box


def load_image(
    source: str | bytes | Path,
    *,
    img_size: int,
    train: bool,
    rng: np.random.Generator | None,
    rrc_scale: tuple[float, float] = (0.35, 1.0),
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    val_crop_pct: float = 0.875,
    draft: bool = True,
    box: Box | None = None,
) -> np.ndarray:
    """Decode ``source`` (path or encoded bytes) to a uint8 (3, img_size, img_size) RGB array.

    ``train=True`` takes a random-resized-crop drawn from ``rng`` (a fresh unseeded generator when None);
    ``train=False`` the deterministic resize + centre crop. ``draft=False`` disables reduced-size JPEG
    decoding (for checks and benchmarks). ``box`` (oriented full-resolution pixels) replaces the drawn/centred crop
    when given (the device decoder's CPU fallback passes the box its worker planned). Raises ``ImageDecodeError``
    naming the file on any failure.
    """
    with planned_image(
        source,
        img_size=img_size,
        train=train,
        rng=rng,
        rrc_scale=rrc_scale,
        rrc_ratio=rrc_ratio,
        val_crop_pct=val_crop_pct,
        box=box,
    ) as (_, _, im, orientation, box):
        scale = 1.0
        if draft and im.format == "JPEG":
            # Ask for the smallest decode that keeps >= img_size pixels across the crop's shorter side.
            crop_short = min(box[2] - box[0], box[3] - box[1])
            factor = img_size / crop_short
            if factor < 0.5:  # only worth it (and only possible) when at least a 1/2-scale decode fits
                request = (math.ceil(im.size[0] * factor), math.ceil(im.size[1] * factor))
                stored_width = im.size[0]
                result = im.draft("RGB", request)
                if result is not None:
                    scale = stored_width / result[1][2]  # the returned box is the full image in drafted pixels
                    _fast_scaled_decode(im)
        im.load()

    if orientation in _TRANSPOSE:
        im = im.transpose(_TRANSPOSE[orientation])
    if im.mode in _WIDE_MODES:
        im = _to_8bit(im)
    if im.mode not in ("RGB", "L"):
        # Palette/alpha/CMYK/16-bit: convert first, since Pillow resizes "P" and "1" with nearest neighbour only.
        im = im.convert("RGB")
    if scale != 1.0:
        box = (box[0] / scale, box[1] / scale, box[2] / scale, box[3] / scale)
    im = im.resize((img_size, img_size), RESAMPLE, box=box, reducing_gap=None)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
