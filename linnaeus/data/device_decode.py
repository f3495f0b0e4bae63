"""Main-process side of device decode: encoded batch → uint8 (B, 3, S, S) on the training device.

``DeviceDecoder.decode(batch, device)`` decodes the batch's JPEGs with torchvision's batched decoder on ``device``
(nvJPEG on CUDA, libjpeg-turbo on the CPU, which is how CI runs this path), applies each image's EXIF orientation,
and resizes each planned crop box to S x S with the filter ``load_image`` uses: Pillow's antialiased bilinear
resample of a fractional source box (triangle filter whose support widens with the downscale factor, weights
renormalised at the image border, the horizontal pass rounded to uint8 before the vertical pass). The taps are
computed here from the box, so the output matches Pillow on the same full-resolution pixels to within one level
of rounding; flips, colour, normalisation stay with ``linnaeus.aug``.

Geometry and randomness are decided by the worker (``linnaeus.data.encoded``), so a batch is a pure function of
(seed, epoch, index) and the bytes, as with CPU decode, and exact resume is unaffected. The one pixel-level
difference from ``DATA.DECODE: cpu`` is the CPU path's reduced-size JPEG decode (``Image.draft``): it averages
in the DCT domain where the device resamples full-resolution pixels (see tests/unit/test_device_decode.py for the
measured error).

Fallbacks, counted in ``fallbacks``: samples a worker already decoded on the CPU (non-JPEG, CMYK), and JPEGs the
device decoder rejects here, which are decoded by ``load_image`` with the planned box in this process.

On a CPU training device (``resolve_decode_mode`` → ``"worker"``) the main process has nothing to offload to, so
each loader worker runs this same decoder on its own batch (``decode_in_worker``) and the batch arrives decoded,
its counts in ``decode_counts``; decoding serially in the main process would make the CPU run several times slower.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from linnaeus.data.encoded import ENCODED_KEYS, collate_samples, is_encoded
from linnaeus.data.images import PLACEHOLDER_VALUE, ImageDecodeError, load_image
from linnaeus.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "cpu", "device")  # DATA.DECODE
COUNTS_KEY = "decode_counts"  # int64 (3,): decoded, fallbacks, missing of a batch decoded in a loader worker


def resolve_decode_mode(value: str, device: torch.device | str | None = None) -> str:
    """``DATA.DECODE`` and the training device → where batches are decoded (``encoded.DECODE_PLACES``).

    ``cpu``: Pillow in the loader workers. ``device``: the main process decodes on ``device``; when ``device`` is
    the CPU there is nothing to offload to, so the same decoder runs in the loader workers instead (``"worker"``).
    ``auto``: ``device`` on a CUDA device, else ``cpu``. ``device`` defaults to CUDA when available, else the CPU.
    """
    if value not in DECODE_MODES:
        raise ConfigError(f"DATA.DECODE: expected one of {', '.join(DECODE_MODES)}, got {value!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if value == "cpu" or (value == "auto" and kind != "cuda"):
        return "cpu"
    return "worker" if kind == "cpu" else "device"


def orient(image: Tensor, orientation: int) -> Tensor:
    """(C, H, W) stored pixels → upright, as ``ImageOps.exif_transpose`` (orientation 1-8; others: unchanged)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return torch.rot90(image.transpose(-2, -1), 2, dims=(-2, -1))
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def _resample_matrix(start: float, end: float, in_size: int, out_size: int, device: torch.device) -> tuple[Tensor, int]:
    """Pillow's bilinear resample coefficients for source span [start, end) → out_size samples, as a dense
    (out_size, n) float32 matrix over source pixels [first, first + n) (rows sum to 1); returns (matrix, first).

    The window bounds are computed in Python from the box (the same float64 arithmetic), so building the matrix
    never waits for the device.
    """
    scale = (end - start) / out_size
    filter_scale = max(scale, 1.0)
    support = filter_scale  # the bilinear (triangle) kernel has support 1, stretched when downscaling
    first = max(math.trunc(start + 0.5 * scale - support + 0.5), 0)
    last = min(math.trunc(start + (out_size - 0.5) * scale + support + 0.5), in_size)
    centre = start + (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale
    lo = torch.clamp(torch.trunc(centre - support + 0.5), min=0)[:, None]
    hi = torch.clamp(torch.trunc(centre + support + 0.5), max=in_size)[:, None]
    index = torch.arange(first, last, device=device, dtype=torch.float64)[None, :]
    weight = torch.clamp(1.0 - torch.abs((index - centre[:, None] + 0.5) / filter_scale), min=0.0)
    weight = weight * ((index >= lo) & (index < hi))
    weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return weight.float(), first


def resize_box(image: Tensor, box: tuple[float, float, float, float], size: int) -> Tensor:
    """uint8 (C, H, W) → uint8 (C, size, size): the ``box`` region resampled like Pillow's BILINEAR resize.

    Two matrix products over the pixels the box's filter taps touch (dense band matrices: one GEMM per axis is
    faster on every device than gathering the few taps per output pixel)."""
    _, height, width = image.shape
    left, top, right, bottom = box
    wx, x0 = _resample_matrix(left, right, width, size, image.device)
    wy, y0 = _resample_matrix(top, bottom, height, size, image.device)
    window = image[:, y0 : y0 + wy.shape[1], x0 : x0 + wx.shape[1]].float()
    horizontal = torch.matmul(window, wx.t()).round_().clamp_(0, 255)  # Pillow keeps this pass in uint8
    out = torch.matmul(wy, horizontal)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _window(start: float, end: float, in_size: int, out_size: int) -> tuple[int, int]:
    """The source pixels [first, last) that Pillow's taps for [start, end) → out_size touch."""
    scale = (end - start) / out_size
    support = max(scale, 1.0)
    first = max(math.trunc(start + 0.5 * scale - support + 0.5), 0)
    last = min(math.trunc(start + (out_size - 0.5) * scale + support + 0.5), in_size)
    return first, last


def _batched_matrices(spans: Tensor, firsts: Tensor, in_sizes: Tensor, width: int, out_size: int) -> Tensor:
    """(B, out_size, width) resample matrices; sample b's column j is source pixel ``firsts[b] + j``."""
    start, end = spans[:, 0:1], spans[:, 1:2]  # (B, 1) float64
    scale = (end - start) / out_size
    filter_scale = scale.clamp_min(1.0)
    centre = start + (torch.arange(out_size, device=spans.device, dtype=torch.float64) + 0.5) * scale  # (B, S)
    lo = torch.clamp(torch.trunc(centre - filter_scale + 0.5), min=0)[:, :, None]
    hi = torch.minimum(torch.trunc(centre + filter_scale + 0.5), in_sizes[:, None])[:, :, None]
    index = (firsts[:, None] + torch.arange(width, device=spans.device, dtype=torch.float64))[:, None, :]
    weight = torch.clamp(1.0 - torch.abs((index - centre[:, :, None] + 0.5) / filter_scale[:, :, None]), min=0.0)
    weight = weight * ((index >= lo) & (index < hi))
    return (weight / weight.sum(dim=2, keepdim=True).clamp_min(1e-12)).float()


def _pillow_resize(image: Tensor, box: tuple[float, float, float, float], size: int) -> Tensor:
    """``resize_box`` on the CPU by Pillow itself: the reference filter, exactly, and on one core ~10x cheaper than
    the dense band products (which suit a GPU). torchvision's decoder returns a channels-last buffer seen as
    (C, H, W), so Pillow reads it without a copy (an EXIF-rotated view is copied once)."""
    from PIL import Image

    from linnaeus.data.images import RESAMPLE

    pixels = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    height, width = pixels.shape[:2]
    rgb = Image.frombuffer("RGB", (width, height), pixels, "raw", "RGB", 0, 1)
    out = np.asarray(rgb.resize((size, size), RESAMPLE, box=box, reducing_gap=None))
    return torch.from_numpy(out.transpose(2, 0, 1).copy())


def resize_boxes(
    images: list[Tensor], boxes: list[tuple[float, float, float, float]], size: int, budget_bytes: int = 256 << 20
) -> Tensor:
    """``resize_box`` for many images at once: uint8 (B, 3, size, size).

    On the CPU (CI, and loader workers when training on the CPU) each image is resized by Pillow (``_pillow_resize``:
    the same filter, exact). Elsewhere (``banded_resize_boxes``) each image's filter window is copied into a
    zero-padded float batch and both passes run as two batched matrix products, so the device sees a handful of
    kernels per chunk instead of a dozen per image; chunks keep the padded batch under ``budget_bytes``.
    """
    if images and images[0].device.type == "cpu":
        return torch.stack([_pillow_resize(image, box, size) for image, box in zip(images, boxes, strict=True)])
    return banded_resize_boxes(images, boxes, size, budget_bytes)


def banded_resize_boxes(
    images: list[Tensor], boxes: list[tuple[float, float, float, float]], size: int, budget_bytes: int = 256 << 20
) -> Tensor:
    """``resize_boxes`` as batched band-matrix products on any device (what a GPU runs; see ``resize_boxes``)."""
    count = len(images)
    out = torch.empty((count, 3, size, size), dtype=torch.uint8, device=images[0].device if images else "cpu")
    windows = []
    for image, (left, top, right, bottom) in zip(images, boxes, strict=True):
        _, height, width = image.shape
        windows.append((_window(left, right, width, size), _window(top, bottom, height, size), height, width))
    begin = 0
    while begin < count:
        end, rows, cols = begin, 0, 0
        while end < count:
            (x0, x1), (y0, y1), _, _ = windows[end]
            new_rows, new_cols = max(rows, y1 - y0), max(cols, x1 - x0)
            if end > begin and (end - begin + 1) * 3 * new_rows * new_cols * 4 > budget_bytes:
                break
            rows, cols, end = new_rows, new_cols, end + 1
        device = images[begin].device
        batch = torch.zeros((end - begin, 3, rows, cols), dtype=torch.float32, device=device)
        for k in range(begin, end):
            (x0, x1), (y0, y1), _, _ = windows[k]
            batch[k - begin, :, : y1 - y0, : x1 - x0] = images[k][:, y0:y1, x0:x1]
        meta = torch.tensor(
            [
                [b[0], b[2], b[1], b[3], w[0][0], w[1][0], w[3], w[2]]
                for b, w in zip(boxes[begin:end], windows[begin:end], strict=True)
            ],
            dtype=torch.float64,
        ).to(device, non_blocking=True)
        wx = _batched_matrices(meta[:, 0:2], meta[:, 4], meta[:, 6], cols, size)
        wy = _batched_matrices(meta[:, 2:4], meta[:, 5], meta[:, 7], rows, size)
        horizontal = torch.matmul(batch, wx.transpose(1, 2)[:, None]).round_().clamp_(0, 255)
        vertical = torch.matmul(wy[:, None], horizontal)
        out[begin:end] = vertical.round_().clamp_(0, 255).to(torch.uint8)
        begin = end
    return out


def _decode_jpegs(chunks: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """Batched decode to RGB on ``device``; when the batch call fails, each image alone (None where it fails)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which has no batched nvJPEG yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(chunks, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        out: list[Tensor | None] = []
        for chunk in chunks:
            try:
                out.append(decode_jpeg([chunk], mode=ImageReadMode.RGB, device=device)[0])
            except RuntimeError:
                out.append(None)
        return out


class DeviceDecoder:
    """Turns a batch from the loader into device tensors ready for augmentation (see the module docstring).

    ``decode(batch, device)`` returns a new dict: ``image`` uint8 (B, 3, S, S) on ``device`` replaces the encoded
    fields; every other entry is passed through unchanged (move it as before). A batch that is already decoded
    (``DATA.DECODE: cpu``) is returned as it is, so the loop can call this unconditionally; one decoded in a loader
    worker (``decode_in_worker``) has its ``decode_counts`` added here and removed. ``decoded``, ``fallbacks`` and
    ``missing`` count this process's samples (and its workers') since construction.
    """

    def __init__(self, *, allow_missing: bool = False) -> None:
        self.allow_missing = bool(allow_missing)
        self.decoded = 0
        self.fallbacks = 0
        self.missing = 0

    def counts(self) -> dict[str, int]:
        return {"decoded_on_device": self.decoded, "decode_fallbacks": self.fallbacks}

    def decode(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
        if not is_encoded(batch):
            if COUNTS_KEY not in batch:
                return batch
            decoded, fallbacks, missing = batch[COUNTS_KEY].tolist()
            self.decoded, self.fallbacks, self.missing = (
                self.decoded + decoded,
                self.fallbacks + fallbacks,
                self.missing + missing,
            )
            return {k: v for k, v in batch.items() if k != COUNTS_KEY}
        device = torch.device(device)
        offsets = batch["image_offsets"].tolist()
        blob: Tensor = batch["image_bytes"]
        boxes = batch["crop_box"].tolist()
        orientations = batch["orientation"].tolist()
        fallback: Tensor = batch["image_fallback"]
        count, size = len(offsets) - 1, int(fallback.shape[-1])
        # Observation batches (``view_mask`` (B, K)) carry B*K images, view after view; flags and rows per view.
        views = batch.get("view_mask")
        ok_in = batch.get("image_ok")
        ok = ok_in.reshape(-1) if ok_in is not None else None
        row_of = batch["view_rows"].reshape(-1) if "view_rows" in batch else batch.get("row")
        present = views.reshape(-1).tolist() if views is not None else [True] * count

        images = torch.empty((count, 3, size, size), dtype=torch.uint8, device=device)
        encoded = [i for i in range(count) if offsets[i + 1] > offsets[i]]
        worker_done = [i for i in range(count) if offsets[i + 1] == offsets[i]]
        if worker_done:
            images[torch.tensor(worker_done, device=device)] = fallback.to(device, non_blocking=True)
        self.fallbacks += sum(1 for i in worker_done if present[i] and (ok is None or bool(ok[i])))

        chunks = [blob[offsets[i] : offsets[i + 1]] for i in encoded]
        decoded = _decode_jpegs(chunks, device) if chunks else []
        on_device = [(i, pixels) for i, pixels in zip(encoded, decoded, strict=True) if pixels is not None]
        if on_device:
            upright = [orient(pixels, orientations[i]) for i, pixels in on_device]
            resized = resize_boxes(upright, [tuple(boxes[i]) for i, _ in on_device], size)
            if len(on_device) == count:  # the usual case: no index tensor to copy to the device
                images = resized
            else:
                images.index_copy_(0, torch.tensor([i for i, _ in on_device]).to(device), resized)
            self.decoded += len(on_device)
        new_ok = None
        for k, (i, pixels) in enumerate(zip(encoded, decoded, strict=True)):
            if pixels is not None:
                continue
            self.fallbacks += 1
            try:
                data = chunks[k].numpy().tobytes()
                cpu = load_image(data, img_size=size, train=False, rng=None, box=tuple(boxes[i]))
            except ImageDecodeError as err:
                row = int(row_of[i]) if row_of is not None else -1
                if not self.allow_missing:
                    raise DataError(
                        f"image at labels.h5 row {row}: {err.reason}; fix or remove it, or set "
                        "DATA.HYBRID.ALLOW_MISSING_IMAGES True to replace and count it"
                    ) from None
                self.missing += 1
                log.warning("image at labels.h5 row %d: %s; using a grey placeholder", row, err.reason)
                images[i] = PLACEHOLDER_VALUE
                if new_ok is None:
                    new_ok = ok.clone() if ok is not None else torch.ones(count, dtype=torch.bool)
                new_ok[i] = False
                continue
            images[i] = torch.from_numpy(cpu).to(device)

        out = {k: v for k, v in batch.items() if k not in ENCODED_KEYS}
        out["image"] = images if views is None else images.view(*views.shape, 3, size, size)
        if new_ok is not None:
            out["image_ok"] = new_ok if ok_in is None else new_ok.view_as(ok_in)
        return out


def decode_in_worker(batch: dict[str, Any], *, allow_missing: bool) -> dict[str, Any]:
    """Decode a planned batch on the CPU inside a loader worker (``decode="worker"``): exactly what the main
    process's ``DeviceDecoder`` would do with it on the CPU, plus ``decode_counts`` so that decoder still counts
    these samples. Raises the same one-line ``DataError`` for an undecodable image unless ``allow_missing``."""
    decoder = DeviceDecoder(allow_missing=allow_missing)
    out = decoder.decode(batch, "cpu")
    out[COUNTS_KEY] = torch.tensor([decoder.decoded, decoder.fallbacks, decoder.missing], dtype=torch.int64)
    return out


def collate_and_decode(samples: list[dict[str, Any]], *, allow_missing: bool) -> dict[str, Any]:
    """A file loader's ``collate_fn`` for ``decode="worker"``: ``collate_samples`` then ``decode_in_worker``."""
    return decode_in_worker(collate_samples(samples), allow_missing=allow_missing)
