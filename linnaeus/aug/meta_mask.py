"""Metadata masking for training: a sample loses all of its metadata, or (partial masking) one whitelisted group of
components, so the model also learns to classify from the image alone or from incomplete context."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class MetaMasking:
    """Zeroes masked components' columns in ``meta`` and clears them in ``meta_valid`` (B, C).

    ``components``/``dims``: the metadata components in column order and their widths. ``whitelist``: groups of
    component names that partial masking may drop together (names absent from ``components`` are ignored).
    """

    def __init__(self, components: Sequence[str], dims: Sequence[int], whitelist: Sequence[Sequence[str]] = ()) -> None:
        names = list(components)
        self.groups = [[names.index(n) for n in group if n in names] for group in whitelist]
        # column -> the component it belongs to, so a component mask expands to columns with one gather
        self.column_component = torch.repeat_interleave(
            torch.arange(len(dims)), torch.as_tensor(list(dims), dtype=torch.long)
        )

    def __call__(
        self, meta: Tensor, meta_valid: Tensor, *, p_all: float, p_partial: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Each sample drops everything with probability ``p_all`` and, independently, one whitelisted group
        (picked uniformly) with probability ``p_partial``. The draws are the same whatever the outcome, so the
        generator's stream does not depend on the data."""
        if meta.shape[1] == 0:
            return meta, meta_valid
        b = meta.shape[0]
        drop = torch.rand(b, generator=generator, device=meta.device) < p_all
        comp_drop = drop[:, None].expand(-1, meta_valid.shape[1]).clone()
        if p_partial > 0 and self.groups:
            pick = torch.randint(len(self.groups), (b,), generator=generator, device=meta.device)
            hit = torch.rand(b, generator=generator, device=meta.device) < p_partial
            for gi, cols in enumerate(self.groups):
                if cols:
                    comp_drop[:, cols] |= (hit & (pick == gi))[:, None]
        keep_columns = (~comp_drop)[:, self.column_component.to(meta.device)].to(meta.dtype)
        return meta * keep_columns, meta_valid & ~comp_drop
