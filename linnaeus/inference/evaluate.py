"""Score a bundle on a split of the training data with the Predictor: the check that an export (from DDP or ZeRO-3
shards) serves the model that validation measured."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from linnaeus.inference.predictor import Predictor

if TYPE_CHECKING:
    from linnaeus.config import Config
    from linnaeus.data.prepare import PreparedData


def evaluate_bundle(
    bundle_dir: str | os.PathLike,
    cfg_or_prepared: Config | PreparedData,
    split: str = "val",
    *,
    batch_size: int = 64,
    consistent: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Per-rank top-1 (``<task_key>/top1``, ``<task_key>/count``), ``chain_accuracy`` and ``samples`` on ``split``.

    Images go through the Predictor's preprocessing; metadata is the split's packed labels.h5 vector, as validation
    uses it. Targets are matched by taxon id, so the bundle's class maps are the reference. ``consistent=False``
    (default) scores per-rank argmax, the definition ``val/<key>/top1`` uses; True scores the decoded chain.
    """
    from linnaeus.config.resolve_data import data_spec
    from linnaeus.data.prepare import PreparedData, prepare_data

    data = (
        cfg_or_prepared
        if isinstance(cfg_or_prepared, PreparedData)
        else prepare_data(data_spec(cfg_or_prepared), check_images=False)
    )
    predictor = Predictor.from_bundle(bundle_dir, device)
    view = data.view(split)
    paths = data.image_paths(split)
    meta = torch.from_numpy(data.samples(split, with_paths=False).meta)
    keys = predictor.task_keys
    cmaps = predictor.bundle.class_maps
    targets = {k: cmaps[k].index(view.store.taxa[k][view.rows]) for k in keys}
    predicted = {k: np.full(len(paths), -1, np.int64) for k in keys}
    for start in range(0, len(paths), batch_size):
        end = start + batch_size
        lp = predictor.log_probs(predictor.load_images(paths[start:end]), meta[start:end])
        if consistent:
            from linnaeus.inference.decoding import decode

            for i, d in enumerate(decode(lp, predictor.hierarchy, top_k=1, consistent=True)):
                for key, c in d.chosen().items():
                    predicted[key][start + i] = -1 if c is None else c
        else:
            for key in keys:
                predicted[key][start:end] = lp[key].argmax(dim=1).numpy()
    out: dict[str, float] = {}
    all_labelled = np.ones(len(paths), bool)
    all_right = np.ones(len(paths), bool)
    for key in keys:
        labelled = targets[key] >= 0
        right = labelled & (predicted[key] == targets[key])
        out[f"{key}/top1"] = float(right.sum()) / max(int(labelled.sum()), 1)
        out[f"{key}/count"] = float(labelled.sum())
        all_labelled &= labelled
        all_right &= right
    out["chain_accuracy"] = float(all_right.sum()) / max(int(all_labelled.sum()), 1)
    out["samples"] = float(len(paths))
    return out
