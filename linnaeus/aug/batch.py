"""The training-time device augmentation pipeline: flip → colour jitter → normalise → erase → selective mix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from linnaeus.aug.mix import cutmix_box, draw_mix_numbers, pair_within_groups, resolve_group_level, soft_targets
from linnaeus.aug.normalize import compute_dtype, normalize_unit, to_float_uint8
from linnaeus.aug.photometric import color_jitter, random_erase, random_hflip
from linnaeus.errors import ConfigError
from linnaeus.specs.model import AugSpec


@dataclass
class AugOutput:
    """An augmented batch.

    ``targets`` holds the input int64 (B,) targets when no mixing happened, else float32 (B, K) soft targets for
    every task (all-zero rows where ``valid`` is False). ``valid[task]`` is bool (B,): target >= 0, or for mixed
    batches the AND over both partners. ``mix_mode`` is None, "mixup" or "cutmix"; ``lam`` the per-sample weight of
    the sample itself (1 for unpaired samples) and ``partner`` int64 (B,) the sample it was mixed with (itself when
    unpaired); both None when no mixing happened.
    """

    images: Tensor
    targets: dict[str, Tensor]
    valid: dict[str, Tensor]
    meta: Tensor
    meta_valid: Tensor
    mix_mode: str | None = None
    lam: Tensor | None = None
    partner: Tensor | None = None


def _check_range(key: str, values: Sequence[float], lo: float, hi: float | None) -> tuple[float, float]:
    ok = len(values) == 2 and lo < values[0] <= values[1] and (hi is None or values[1] <= hi)
    if not ok:
        upper = f" <= {hi}" if hi is not None else ""
        raise ConfigError(f"{key}: expected [min, max] with {lo} < min <= max{upper}, got {list(values)}")
    return float(values[0]), float(values[1])


class BatchAugment:
    """Batched, generator-driven augmentation of one training batch on the tensors' own device.

    ``mix_prob`` is the already-scheduled mixing probability for this step (the schedule lives in the engine);
    it gates mixing once per batch, and SCHEDULE.MIX.MIXUP/CUTMIX.ENABLED (``spec.mix``) say which algorithms may run.
    """

    def __init__(
        self,
        spec: AugSpec,
        task_keys: list[str],
        num_classes: dict[str, int],
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        missing = [k for k in task_keys if k not in num_classes]
        if missing:
            raise ConfigError(f"DATA.NUM_CLASSES_PER_LEVEL: no class count for {missing} (task keys {task_keys})")
        if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
            raise ConfigError(
                f"AUG.MEAN/AUG.STD: expected 3 values each, STD > 0, got {list(spec.mean)} / {list(spec.std)}"
            )
        erase, mix = spec.random_erase, spec.mix
        self.erase_area = _check_range("AUG.RANDOM_ERASE.AREA_RANGE", erase.area_range, 0.0, 1.0)
        self.erase_aspect = _check_range("AUG.RANDOM_ERASE.ASPECT_RATIO", erase.aspect_ratio, 0.0, None)
        self.erase_prob = float(erase.prob)
        self.hflip_prob = float(spec.hflip_prob)
        self.jitter = float(spec.color_jitter)
        self.mean = tuple(float(v) for v in spec.mean)
        self.std = tuple(float(v) for v in spec.std)
        self.task_keys = list(task_keys)
        self.num_classes = {k: int(num_classes[k]) for k in task_keys}
        self.group_key = resolve_group_level(mix.group_level, self.task_keys)
        self.mixup_alpha = float(mix.mixup.alpha) if mix.mixup.enabled else None
        self.cutmix_alpha = float(mix.cutmix.alpha) if mix.cutmix.enabled else None
        self.switch_prob = float(mix.switch_prob)
        self.dtype = dtype

    def photometric(self, images_uint8: Tensor, generator: torch.Generator) -> Tensor:
        """Flip, jitter, normalise, erase (no mixing): normalised float images in the compute dtype."""
        images = random_hflip(images_uint8, self.hflip_prob, generator)  # on uint8: a quarter of the bytes
        x = to_float_uint8(images, compute_dtype(self.dtype))
        x = color_jitter(x, self.jitter, generator)
        x = normalize_unit(x, self.mean, self.std)
        return random_erase(x, self.erase_prob, self.erase_area, self.erase_aspect, generator)

    def __call__(
        self,
        images_uint8: Tensor,
        targets: dict[str, Tensor],
        meta: Tensor,
        meta_valid: Tensor,
        *,
        mix_prob: float,
        generator: torch.Generator,
        host_generator: torch.Generator | None = None,
    ) -> AugOutput:
        """``generator`` draws on the images' device; ``host_generator`` (a CPU generator; default ``generator``
        itself when that is on the CPU) draws the batch-level numbers of mixing, which the host needs to decide
        (whether to mix, which algorithm, the CutMix box) without waiting for the device."""
        x = self.photometric(images_uint8, generator)
        int_targets = {k: targets[k] for k in self.task_keys}
        out = AugOutput(
            images=x,
            targets=int_targets,
            valid={k: t >= 0 for k, t in int_targets.items()},
            meta=meta,
            meta_valid=meta_valid,
        )
        if mix_prob > 0 and (self.mixup_alpha is not None or self.cutmix_alpha is not None):
            host = host_generator if host_generator is not None else generator
            if host.device.type != "cpu":
                raise ValueError(
                    "BatchAugment: mixing needs host_generator (a CPU generator) beside a device generator"
                )
            self._mix(out, mix_prob, generator, host)
        out.images = out.images.to(self.dtype)
        return out

    def _mix(self, out: AugOutput, mix_prob: float, generator: torch.Generator, host: torch.Generator) -> None:
        x = out.images
        device = x.device
        # Batch-level numbers are drawn on the host (no device read to decide on them); pairs on the device. A
        # fixed draw sequence keeps both streams independent of the decisions. A batch in which nobody has a
        # partner is mixed with itself: images and metadata unchanged, one-hot soft targets (the same loss), and
        # no need to ask the device whether any pair exists.
        draws = draw_mix_numbers(host, self.mixup_alpha or 1.0, self.cutmix_alpha or 1.0)
        partner, has_partner = pair_within_groups(out.targets[self.group_key], generator)
        if draws.gate >= mix_prob:
            return

        use_cutmix = self.mixup_alpha is None or (self.cutmix_alpha is not None and draws.switch < self.switch_prob)
        if use_cutmix:
            height, width = x.shape[-2:]
            y0, y1, x0, x1, lam = cutmix_box(draws.lam_cutmix, height, width, draws.centre_y, draws.centre_x)
        else:
            lam = draws.lam_mixup
        lam_vec = torch.ones(partner.shape[0], dtype=x.dtype, device=device).masked_fill_(has_partner, lam)
        if use_cutmix:
            mixed = x.clone()
            # Unpaired samples are their own partner, so pasting their own pixels leaves them unchanged.
            mixed[:, :, y0:y1, x0:x1] = x[partner, :, y0:y1, x0:x1]
        else:
            w = lam_vec.view(-1, 1, 1, 1)
            mixed = x * w + x[partner] * (1.0 - w)  # w = 1 for unpaired samples: exactly x

        soft, valid = {}, {}
        for key, target in out.targets.items():
            soft[key], valid[key] = soft_targets(target, partner, lam_vec, self.num_classes[key])
        # Metadata cannot be interpolated meaningfully: take the dominant sample's (ties go to the sample itself).
        src = torch.where(lam_vec < 0.5, partner, torch.arange(partner.shape[0], device=device))
        out.images, out.targets, out.valid = mixed, soft, valid
        out.meta, out.meta_valid = out.meta[src], out.meta_valid[src]
        out.mix_mode, out.lam, out.partner = ("cutmix" if use_cutmix else "mixup"), lam_vec, partner
