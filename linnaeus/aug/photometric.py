"""Per-sample geometric/photometric augmentations, batched on the images' device.

Every op draws all of its randomness for the whole batch in a few tensor calls from the caller's generator, so a
batch is a pure function of (input, generator state) on a given device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# ITU-R 601 luma, as torchvision's rgb_to_grayscale, so jitter strengths mean what users expect from torchvision.
_LUMA = (0.299, 0.587, 0.114)


def random_hflip(images: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """Flip each sample left-right with probability ``prob``. Works on any dtype (used on uint8, before casting)."""
    if prob <= 0:
        return images
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < prob
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def color_jitter(x01: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Brightness, contrast, saturation, each with a per-sample factor ~ U[max(0, 1 - s), 1 + s].

    ``x01`` is float RGB in [0, 1]. The order is fixed (brightness → contrast → saturation) rather than shuffled
    per sample as torchvision does: a per-sample order cannot be batched without running all 6 orders.
    """
    if strength <= 0:
        return x01
    b = x01.shape[0]
    lo = max(0.0, 1.0 - strength)
    factors = lo + (1.0 + strength - lo) * torch.rand(3, b, generator=generator, device=x01.device, dtype=x01.dtype)
    fb, fc, fs = factors.view(3, b, 1, 1, 1).unbind(0)
    x = (x01 * fb).clamp_(0.0, 1.0)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * fc + mean).clamp_(0.0, 1.0)
    gray = _gray(x)
    return ((x - gray) * fs + gray).clamp_(0.0, 1.0)


def erase_boxes(
    shape: torch.Size | Sequence[int],
    prob: float,
    area_range: Sequence[float],
    aspect_range: Sequence[float],
    generator: torch.Generator,
    device: torch.device,
    attempts: int = 10,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Draw one timm-style erase box per sample: (apply (B,) bool, top, left, h, w (B,) int64).

    Area fraction ~ U(area_range), log aspect ~ U(log aspect_range); like timm, up to ``attempts`` draws per sample
    and the first that fits strictly inside the image wins. Samples where none fits are not erased.
    """
    bsz, _, height, width = shape
    apply = torch.rand(bsz, generator=generator, device=device) < prob
    u = torch.rand(4, bsz, attempts, generator=generator, device=device, dtype=torch.float64)
    area = height * width * (area_range[0] + (area_range[1] - area_range[0]) * u[0])
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    h = torch.round(torch.sqrt(area * ratio)).long()
    w = torch.round(torch.sqrt(area / ratio)).long()
    fits = (h > 0) & (w > 0) & (h < height) & (w < width)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting attempt (0 when none)
    apply &= fits.any(dim=1)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    # Positions use the first attempt's own uniforms; randint(0, H - h) inclusive, as timm.
    top = torch.floor(u[2].gather(1, first).squeeze(1) * (height - h + 1)).long()
    left = torch.floor(u[3].gather(1, first).squeeze(1) * (width - w + 1)).long()
    return apply, top, left, h, w


def random_erase(
    x: Tensor,
    prob: float,
    area_range: Sequence[float],
    aspect_range: Sequence[float],
    generator: torch.Generator,
) -> Tensor:
    """Replace one box per chosen sample with per-pixel N(0, 1) noise.

    Call on *normalised* images: unit normal noise then matches the data's per-channel statistics (timm's 'pixel'
    mode), which is why erasing runs after normalisation.
    """
    if prob <= 0:
        return x
    bsz, _, height, width = x.shape
    apply, top, left, h, w = erase_boxes(x.shape, prob, area_range, aspect_range, generator, x.device)
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    top, left, h, w = (t.view(bsz, 1, 1) for t in (top, left, h, w))
    mask = apply.view(bsz, 1, 1) & (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.where(mask.unsqueeze(1), noise, x)
