"""uint8 → float normalisation shared by training, validation and inference.

There is exactly one definition of "normalised image" in Linnaeus, so a model trained here sees identical pixel
statistics at validation and at inference time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

MeanStd = Sequence[float] | Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precision for pixel ops: half types round too coarsely for jitter/blend maths, so work in fp32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _channel_vector(values: MeanStd, like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)


def normalize_unit(x01: Tensor, mean: MeanStd, std: MeanStd) -> Tensor:
    """Normalise float images in [0, 1]: ``(x - mean) / std`` per channel (the single normalisation formula)."""
    return (x01 - _channel_vector(mean, x01)) / _channel_vector(std, x01)


def to_float_uint8(images_uint8: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 (B, C, H, W) → float in [0, 1] at ``dtype``. Raises TypeError for anything that is not uint8 NCHW."""
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        # A float batch here would be divided by 255 a second time and silently train on near-black images.
        raise TypeError(
            f"expected uint8 images of shape (B, C, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}"
        )
    return images_uint8.to(dtype) / 255.0


def to_float_normalized(
    images_uint8: Tensor, mean: MeanStd, std: MeanStd, dtype: torch.dtype = torch.float32
) -> Tensor:
    """uint8 (B, 3, H, W) → ``(x / 255 - mean) / std`` as ``dtype`` on the images' device."""
    x = normalize_unit(to_float_uint8(images_uint8, compute_dtype(dtype)), mean, std)
    return x.to(dtype)


def eval_transform(images_uint8: Tensor, mean: MeanStd, std: MeanStd, dtype: torch.dtype = torch.float32) -> Tensor:
    """Validation/inference device transform: normalisation only, no augmentation."""
    return to_float_normalized(images_uint8, mean, std, dtype)
