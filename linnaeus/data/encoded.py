"""Worker side of device decode (``DATA.DECODE: device``): read bytes and plan the crop, but do not decode.

A worker opens each image with Pillow only far enough to read its header (format, mode, size, EXIF orientation;
no pixel data is decoded), draws the crop box with exactly the rule ``load_image`` uses (``images.crop_box``: the
same generator draws, in the same order, on the same oriented full-resolution size) and ships the encoded bytes
plus the box. The main process decodes the whole batch on the training device (``linnaeus.data.device_decode``).

Images the device decoder cannot take are decoded right here by ``load_image`` with the planned box, so they cost
no extra work in the main process: anything that is not a JPEG, and JPEGs whose colour model is not RGB/YCbCr or
grayscale (CMYK, YCCK). Those arrive as finished uint8 pixels and are counted by the decoder as CPU fallbacks.

Batch format (``encoded_batch``; the file loader and the shard reader both build it), replacing ``image``:

- ``image_bytes`` uint8 (total,): the encoded files of the device-decoded samples, concatenated in batch order;
- ``image_offsets`` int64 (B + 1,): sample i's bytes are ``image_bytes[off[i]:off[i + 1]]``; an empty range means
  the sample was decoded in the worker and its pixels are the next entry of ``image_fallback``;
- ``image_fallback`` uint8 (F, 3, S, S): worker-decoded samples (fallbacks and placeholders), in batch order;
- ``crop_box`` float64 (B, 4): left, top, right, bottom in oriented full-resolution pixels;
- ``orientation`` int64 (B,): EXIF orientation 1-8 of the stored image.

Where the planned batch is decoded (``decode``, chosen by ``device_decode.resolve_decode_mode``): ``"device"`` in
the main process on the training device; ``"worker"`` (the training device is the CPU, so there is nothing to
offload to) by the same decoder inside the loader worker right after the batch is built, so the batch arrives with
``image`` and a ``decode_counts`` entry instead of the fields above. ``"cpu"`` is the plain path: ``load_image``
per sample, no plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data._utils.collate import default_collate

from linnaeus.data.images import Box, ImageDecodeError, load_image, planned_image

ENCODED_KEYS = ("image_bytes", "image_offsets", "image_fallback", "crop_box", "orientation")
DECODE_PLACES = ("cpu", "device", "worker")  # see the module docstring
DEVICE_MODES = ("RGB", "L")  # Pillow's names for YCbCr/RGB and grayscale JPEGs; CMYK/YCCK decode on the CPU


@dataclass(frozen=True)
class EncodedImage:
    """One sample's image as a worker hands it over: encoded bytes for the device, or finished pixels."""

    size: int  # output side in pixels (DATA.IMG_SIZE)
    box: Box
    orientation: int
    data: bytes | None = None  # JPEG bytes to decode on the device
    pixels: np.ndarray | None = None  # uint8 (3, size, size) decoded in the worker

    @classmethod
    def decoded(cls, pixels: np.ndarray) -> EncodedImage:
        """Pixels that are already final (a CPU fallback or a placeholder)."""
        return cls(size=int(pixels.shape[-1]), box=(0.0, 0.0, 0.0, 0.0), orientation=1, pixels=pixels)


def encode_image(
    source: str | bytes,
    *,
    img_size: int,
    train: bool,
    rng: np.random.Generator | None,
    rrc_scale: tuple[float, float] = (0.35, 1.0),
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    val_crop_pct: float = 0.875,
) -> EncodedImage:
    """Read ``source`` and plan its crop as ``load_image`` would; decode here only what the device cannot.

    Raises ``ImageDecodeError`` naming the file when it cannot be read or its header is not an image.
    """
    with planned_image(
        source,
        img_size=img_size,
        train=train,
        rng=rng,
        rrc_scale=rrc_scale,
        rrc_ratio=rrc_ratio,
        val_crop_pct=val_crop_pct,
    ) as (data, name, im, orientation, box):
        on_device = im.format == "JPEG" and im.mode in DEVICE_MODES
        im.close()
    if on_device:
        return EncodedImage(size=int(img_size), box=box, orientation=orientation, data=data)
    try:
        pixels = load_image(data, img_size=img_size, train=train, rng=None, box=box)
    except ImageDecodeError as err:
        raise ImageDecodeError(name, err.reason) from None
    return EncodedImage(size=int(img_size), box=box, orientation=orientation, pixels=pixels)


def encoded_batch(items: Sequence[EncodedImage]) -> dict[str, Tensor]:
    """The encoded image fields of one batch (see the module docstring); every reader builds batches with this."""
    if not items:
        raise ValueError("encoded_batch: empty batch")
    size = items[0].size
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    chunks: list[bytes] = []
    fallback: list[np.ndarray] = []
    for i, item in enumerate(items):
        if item.size != size:
            raise ValueError(f"encoded_batch: sample {i} has size {item.size}, sample 0 has {size}")
        if item.data is not None:
            chunks.append(item.data)
            offsets[i + 1] = offsets[i] + len(item.data)
        else:
            assert item.pixels is not None
            fallback.append(item.pixels)
            offsets[i + 1] = offsets[i]
    blob = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    pixels = np.stack(fallback) if fallback else np.zeros((0, 3, size, size), dtype=np.uint8)
    return {
        "image_bytes": torch.from_numpy(blob.copy()),
        "image_offsets": torch.from_numpy(offsets),
        "image_fallback": torch.from_numpy(pixels),
        "crop_box": torch.tensor([item.box for item in items], dtype=torch.float64),
        "orientation": torch.tensor([item.orientation for item in items], dtype=torch.int64),
    }


def check_decode(decode: str, who: str) -> str:
    """``decode`` if it is one of ``DECODE_PLACES``, else ValueError naming ``who``."""
    if decode not in DECODE_PLACES:
        raise ValueError(f"{who}: decode must be one of {', '.join(map(repr, DECODE_PLACES))}, got {decode!r}")
    return decode


def read_image(source: str | bytes, *, decode: str, **kwargs: Any) -> np.ndarray | EncodedImage:
    """What a worker produces for one image: ``load_image`` pixels (``decode="cpu"``) or ``encode_image``'s bytes +
    crop plan (``"device"``, ``"worker"``); ``kwargs`` are theirs (img_size, train, rng, rrc_scale, rrc_ratio,
    val_crop_pct)."""
    if check_decode(decode, "read_image") == "cpu":
        return load_image(source, **kwargs)
    return encode_image(source, **kwargs)


def image_fields(items: Sequence[np.ndarray | EncodedImage]) -> dict[str, Tensor]:
    """The image entries of a batch built from ``read_image`` results: ``{"image": uint8 (B, 3, S, S)}`` for pixels,
    the encoded fields (module docstring) for encoded images. Readers that build batches themselves use this."""
    if items and isinstance(items[0], EncodedImage):
        return encoded_batch(items)  # type: ignore[arg-type]
    return {"image": torch.from_numpy(np.stack(items))}  # type: ignore[arg-type]


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate``, except that samples carrying an ``encoded`` image (or ``encoded_views``, a list per
    observation: packed view after view, B*K images) are packed by ``encoded_batch``."""
    key = next((k for k in ("encoded", "encoded_views") if samples and k in samples[0]), None)
    if key is None:
        return default_collate(samples)
    encoded = [s[key] for s in samples] if key == "encoded" else [e for s in samples for e in s[key]]
    rest = default_collate([{k: v for k, v in s.items() if k != key} for s in samples])
    return rest | encoded_batch(encoded)


def is_encoded(batch: dict[str, Any]) -> bool:
    """True for a batch whose images still have to be decoded (``linnaeus.data.device_decode``)."""
    return "image_offsets" in batch
