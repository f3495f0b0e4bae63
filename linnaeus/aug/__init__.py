"""Batch augmentation on the training device (flip, colour jitter, random erasing, selective Mixup/CutMix) and
metadata masking."""

from linnaeus.aug.batch import AugOutput, BatchAugment
from linnaeus.aug.meta_mask import MetaMasking
from linnaeus.aug.mix import pair_within_groups, resolve_group_level
from linnaeus.aug.normalize import eval_transform, to_float_normalized

__all__ = [
    "AugOutput",
    "BatchAugment",
    "MetaMasking",
    "eval_transform",
    "pair_within_groups",
    "resolve_group_level",
    "to_float_normalized",
]
