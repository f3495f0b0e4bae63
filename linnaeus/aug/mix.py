"""Selective Mixup/CutMix: samples only mix with a partner that shares their taxon at the group rank.

Because partners agree at the group rank (and, in a consistent taxonomy, at every coarser rank), mixed targets
at those ranks stay one-hot and the hierarchy of soft targets never contradicts itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from linnaeus.errors import ConfigError

_RANK = re.compile(r"_L(\d+)$")


def rank_number(task_key: str) -> int:
    """The number in ``taxa_LXX`` (larger = coarser)."""
    m = _RANK.search(task_key)
    if m is None:
        raise ConfigError(f"DATA.TASK_KEYS_H5: expected names like 'taxa_L10', got '{task_key}'")
    return int(m.group(1))


def resolve_group_level(group_level: str | None, task_keys: list[str]) -> str:
    """SCHEDULE.MIX.GROUP_LEVEL, defaulting to the coarsest configured rank."""
    if not task_keys:
        raise ConfigError("DATA.TASK_KEYS_H5: expected at least one task key")
    if group_level is None:
        return max(task_keys, key=rank_number)
    if group_level not in task_keys:
        raise ConfigError(f"SCHEDULE.MIX.GROUP_LEVEL: '{group_level}' is not in DATA.TASK_KEYS_H5 {task_keys}")
    return group_level


def pair_within_groups(group: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random partner for each sample among samples with the same non-negative ``group`` id.

    Samples are shuffled, stably sorted by group, and each is paired with the next one in its group (cyclically),
    so every sample is used once as a partner and nobody pairs with itself unless it is alone in its group or its
    group is null (< 0). Returns (partner int64 (B,), has_partner bool (B,)); unpaired samples are their own
    partner, which turns every mixing formula into the identity for them.
    """
    bsz = group.shape[0]
    pos = torch.arange(bsz, device=group.device)
    shuffled = torch.argsort(torch.rand(bsz, generator=generator, device=group.device))
    order = shuffled[torch.argsort(group[shuffled], stable=True)]
    g = group[order]
    boundary = g[1:] != g[:-1]
    is_end = torch.cat([boundary, boundary.new_ones(min(bsz, 1))])
    start = torch.searchsorted(g, g)  # first position of each sample's group in the sorted order
    nxt = torch.where(is_end, start, pos + 1)
    nxt = torch.where(g < 0, pos, nxt)
    partner = torch.empty_like(order)
    partner[order] = order[nxt]
    return partner, partner != pos


def cutmix_box(lam: float, height: int, width: int, cy_u: float, cx_u: float) -> tuple[int, int, int, int, float]:
    """timm's rand_bbox: a box of area ≈ (1 - lam)·H·W centred at a uniform point, clipped to the image.

    ``cy_u``/``cx_u`` are uniforms in [0, 1). Returns (y0, y1, x0, x1, lam) with lam recomputed from the clipped
    box so the targets match the pixels actually pasted.
    """
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = min(int(cy_u * height), height - 1), min(int(cx_u * width), width - 1)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1, 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


@dataclass(frozen=True)
class MixDraws:
    """A batch's mixing decisions, drawn on the host: gate and algorithm uniforms, CutMix box centre, lambdas."""

    gate: float
    switch: float
    centre_y: float
    centre_x: float
    lam_mixup: float
    lam_cutmix: float


def draw_mix_numbers(host: torch.Generator, mixup_alpha: float, cutmix_alpha: float) -> MixDraws:
    """Six numbers in a fixed order from a CPU generator (host tensors only: reading them never waits for a GPU)."""
    if host.device.type != "cpu":
        raise ValueError("draw_mix_numbers: expected a CPU generator")
    gate, switch, cy, cx = torch.rand(4, generator=host, dtype=torch.float64).tolist()
    lam_m = float(sample_beta(mixup_alpha, host, host.device))
    lam_c = float(sample_beta(cutmix_alpha, host, host.device))
    return MixDraws(gate, switch, cy, cx, lam_m, lam_c)


def sample_beta(alpha: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """One draw from Beta(alpha, alpha) via two gammas; torch.distributions cannot take a generator."""
    gam = torch._standard_gamma(torch.full((2,), float(alpha), device=device, dtype=torch.float64), generator=generator)
    return gam[0] / gam.sum().clamp_min(torch.finfo(torch.float64).tiny)


def soft_targets(target: Tensor, partner: Tensor, lam: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """λ·onehot(a) + (1-λ)·onehot(b) as float32 (B, K) and valid = valid_a & valid_b.

    Rows that are invalid (a null on either side) are all-zero: the loss must skip them via ``valid`` (or, with
    null masking, substitute its own uniform target).
    """
    valid = target >= 0
    onehot = torch.nn.functional.one_hot(target.clamp_min(0), num_classes).to(torch.float32)
    lam = lam.to(torch.float32).unsqueeze(1)
    mixed = onehot * lam + onehot[partner] * (1.0 - lam)
    valid = valid & valid[partner]
    return mixed * valid.unsqueeze(1), valid
