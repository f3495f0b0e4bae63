"""Measured model size: parameters and multiply-accumulates of one forward, without heads.

The backbone is built on the meta device, so even mFormerV1_xl at 384 costs no memory or compute. That is also
what makes attention count: on CPU, SDPA runs a fused kernel FlopCounterMode does not know (it reports 0), while
on the meta device SDPA decomposes into the two batched matmuls the counter does know.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from linnaeus.models.builder import build_backbone
from linnaeus.specs.model import ModelSpec


def model_size(spec: ModelSpec, meta_dims: list[int], img_size: int) -> dict:
    """``{'params', 'meta_params', 'gmacs', 'img_size'}`` for the backbone (metadata embedders included, heads not).

    MACs = FLOPs / 2 as counted by ``torch.utils.flop_counter`` (convs, linears, matmuls; not norms or activations).
    """
    at_size = dataclasses.replace(spec, img_size=img_size)
    with torch.device("meta"):
        backbone = build_backbone(at_size, meta_dims)
        image = torch.empty(1, at_size.in_chans, img_size, img_size)
        meta = torch.empty(1, sum(meta_dims)) if meta_dims else None
    backbone.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone(image, meta)
    params = sum(p.numel() for p in backbone.parameters())
    meta_params = sum(p.numel() for n, p in backbone.named_parameters() if ".meta_tokens." in f".{n}")
    return {
        "params": params,
        "meta_params": meta_params,
        "gmacs": counter.get_total_flops() / 2 / 1e9,
        "img_size": img_size,
    }
