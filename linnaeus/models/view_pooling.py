"""Pooling several views of one observation into one feature, before the heads.

An observation is one organism photographed up to K times. The backbone sees each view on its own; the pooled
feature is what the heads classify, so the model learns from every photo together (fusing inside the network beats
fusing scores: Seeland & Mader 2021). Every mode is mask-aware (padded views count for nothing) and is the identity
for a single view, so K = 1 trains exactly like image training.

- ``mean``: the mean over the present views.
- ``lse``: count-normalised log-sum-exp, ``(logsumexp(t·x) - log n) / t``: between the mean (t → 0) and the max
  (t → ∞) per feature, so one telling view can dominate a feature without drowning the others.
- ``attention``: gated attention (Ilse et al. 2018): weights ``softmax_k(w·(tanh(V x_k) ⊙ sigmoid(U x_k)))``.
"""

from __future__ import annotations

import torch
from torch import nn

POOLING_MODES = ("mean", "lse", "attention")


class ViewPooling(nn.Module):
    """(B, K, D) features + (B, K) bool mask of present views → (B, D). Every observation needs one present view."""

    def __init__(self, mode: str, dim: int, temperature: float = 1.0, hidden: int = 128) -> None:
        super().__init__()
        if mode not in POOLING_MODES:
            raise ValueError(f"view pooling: expected one of {POOLING_MODES}, got {mode!r}")
        self.mode = mode
        self.temperature = float(temperature)
        if mode == "attention":
            self.value = nn.Linear(dim, hidden)
            self.gate = nn.Linear(dim, hidden)
            self.score = nn.Linear(hidden, 1)

    def extra_repr(self) -> str:
        return f"mode={self.mode}" + (f", temperature={self.temperature:g}" if self.mode == "lse" else "")

    def weights(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, K) attention weights over the present views (``attention`` mode; reported by inference)."""
        scores = self.score(torch.tanh(self.value(features)) * torch.sigmoid(self.gate(features))).squeeze(-1)
        return scores.float().masked_fill(~mask, float("-inf")).softmax(dim=1).to(features.dtype)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(torch.bool)
        if self.mode == "attention":
            return (self.weights(features, mask).unsqueeze(-1) * features).sum(dim=1)
        present = mask.unsqueeze(-1).to(features.dtype)
        count = present.sum(dim=1).clamp_min(1.0)
        if self.mode == "mean":
            return (features * present).sum(dim=1) / count
        t = self.temperature
        scaled = (t * features.float()).masked_fill(~mask.unsqueeze(-1), float("-inf"))
        pooled = (torch.logsumexp(scaled, dim=1) - torch.log(count.float())) / t
        return pooled.to(features.dtype)


def pack_views(flat: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-photo rows (sum(counts), ...), observation after observation → (N, K, ...) zero-padded to the largest
    observation's K, and the (N, K) bool mask of present views."""
    k = int(counts.max()) if len(counts) else 0
    mask = torch.arange(k, device=counts.device)[None, :] < counts[:, None]
    packed = flat.new_zeros((len(counts), k, *flat.shape[1:]))
    packed[mask.to(flat.device)] = flat
    return packed, mask


def fold_views(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, K, C, H, W) → (B·K, C, H, W) and K, so the backbone sees each view as an image."""
    b, k = images.shape[:2]
    return images.reshape(b * k, *images.shape[2:]), k


def unfold_views(features: torch.Tensor, views: int) -> torch.Tensor:
    """(B·K, D) → (B, K, D)."""
    return features.reshape(features.shape[0] // views, views, *features.shape[1:])


def pooled_features(
    backbone: nn.Module, images: torch.Tensor, meta: torch.Tensor | None, view_mask: torch.Tensor, pooling: ViewPooling
) -> torch.Tensor:
    """Features of B observations: ``images`` (B·K, C, H, W), the views folded into the batch (the trainer folds
    them so augmentation and the memory layout treat each view as an image), ``meta`` (B, D) once per observation,
    ``view_mask`` (B, K). The backbone sees every slot (no data-dependent shapes, so no device sync); empty slots
    are zeros and the mask-aware pooling ignores them. → (B, num_features)."""
    views = view_mask.shape[1]
    if images.shape[0] != view_mask.numel():
        raise ValueError(f"view pooling: {images.shape[0]} images for a (B, K) = {tuple(view_mask.shape)} view mask")
    per_view_meta = None if meta is None else meta.repeat_interleave(views, dim=0)
    return pooling(unfold_views(backbone(images, per_view_meta), views), view_mask)
