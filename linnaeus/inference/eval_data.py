"""Labelled image sets for ``linnaeus evaluate`` / ``calibrate``, and scoring them with a Predictor.

A set is the run's saved validation split (``--split val``: exactly validation's rows, metadata and targets) or a
separate file in the labels.h5 schema (``--labels test.h5 --images DIR``). Targets are mapped by taxon id through
the bundle's class maps; a row whose finest-rank taxon is set but is not a bundle class is *novel* (an unseen
species; its genus or family may still be known). Scoring runs the validation dataset (decode + crop in loader
workers, ``FileDataset``) and the Predictor's forward (``eval_transform`` on the device), so the tensors the model
sees are validation's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linnaeus.config.resolve_data import data_spec
from linnaeus.data.samples import SampleTable
from linnaeus.errors import ConfigError, DataError
from linnaeus.inference.bundle import Bundle
from linnaeus.inference.calibration import set_id


@dataclass
class EvalSet:
    name: str  # "val" or the labels file
    set_id: str  # calibration_set_id: labels fingerprint + rows
    table: SampleTable  # targets: bundle class index per key (-1: null or not a bundle class)
    taxa: dict[str, np.ndarray]  # raw taxon ids per key (0 = null)
    known: dict[str, np.ndarray]  # per key: the taxon is set and is a bundle class
    observation_ids: np.ndarray | None = None  # per row (labels.h5 ``observation_ids``); None when the file has none

    def __len__(self) -> int:
        return len(self.table.rows)

    @property
    def novel(self) -> np.ndarray:
        """Rows whose taxon at the finest configured rank is set but unknown to the bundle."""
        finest = min(self.taxa, key=lambda k: int(k.rsplit("L", 1)[-1]))
        return (self.taxa[finest] != 0) & ~self.known[finest]

    def subset(self, mask: np.ndarray) -> EvalSet:
        return EvalSet(
            self.name,
            self.set_id,
            self.table.take(np.flatnonzero(mask)),
            {k: v[mask] for k, v in self.taxa.items()},
            {k: v[mask] for k, v in self.known.items()},
            None if self.observation_ids is None else self.observation_ids[mask],
        )


def run_dir_of(bundle: Bundle) -> Path | None:
    run = bundle.info.get("run")
    return Path(run) if run and Path(run).is_dir() else None


def train_counts(bundle: Bundle) -> dict[str, np.ndarray] | None:
    """Training images per class (the run's stats.json), or None when the run folder is not at hand."""
    run = run_dir_of(bundle)
    if run is None or not (run / "stats.json").is_file():
        return None
    stats = json.loads((run / "stats.json").read_text())
    counts = stats.get("splits", {}).get("train", {}).get("class_counts", {})
    out = {k: np.asarray(counts[k], np.int64) for k in bundle.task_keys if k in counts}
    return out if len(out) == len(bundle.task_keys) else None


def _mapped(bundle: Bundle, taxa: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    targets, known = {}, {}
    for key in bundle.task_keys:
        idx = bundle.class_maps[key].index(taxa[key])
        targets[key] = idx
        known[key] = idx >= 0
    return targets, known


def from_split(bundle: Bundle, split: str = "val") -> EvalSet:
    """The run's saved split (split.npz), read as validation reads it."""
    from linnaeus.data.prepare import prepare_data
    from linnaeus.data.splits import SPLIT_FILE

    if split not in ("val", "train"):
        raise ConfigError(f"--split {split!r}: expected val (or train)")
    run = run_dir_of(bundle)
    if run is None or not (run / SPLIT_FILE).is_file():
        raise ConfigError(
            f"--split {split}: needs the run folder's {SPLIT_FILE} (bundle.json names run {bundle.info.get('run')!r}, "
            "which is not at hand); pass --labels and --images instead"
        )
    data = prepare_data(data_spec(bundle.cfg), split_file=run / SPLIT_FILE, check_images=False)
    view = data.view(split)
    taxa = {k: np.asarray(view.store.taxa[k][view.rows], np.int64) for k in bundle.task_keys}
    targets, known = _mapped(bundle, taxa)
    s = data.samples(split)
    table = SampleTable(rows=s.rows, targets=targets, meta=s.meta, meta_valid=s.meta_valid, paths=s.paths)
    obs = view.store.observation_ids
    return EvalSet(
        split,
        set_id(split, data.fingerprint, view.rows),
        table,
        taxa,
        known,
        None if obs is None else obs[view.rows],
    )


def from_labels(bundle: Bundle, labels: str | Path, images: str | Path) -> EvalSet:
    """Every row of a separate labels file (the labels.h5 schema, the run's metadata components)."""
    from linnaeus.data.labels import LabelStore
    from linnaeus.data.paths import resolve_image_paths
    from linnaeus.data.rules import raise_first

    labels, images = Path(labels), Path(images)
    if not labels.is_file():
        raise DataError(f"--labels {labels}: no such file")
    if not images.is_dir():
        raise DataError(f"--images {images}: no such folder")
    spec = data_spec(bundle.cfg)
    store = LabelStore.load(labels, list(spec.task_keys), list(spec.meta.components))
    rows = np.arange(store.n_rows, dtype=np.int64)
    paths, refused = resolve_image_paths(
        images,
        store.identifiers,
        rows,
        spec.images.file_extension,
        labels_path=labels,
        allow_symlinks_outside=spec.images.allow_symlinks_outside,
    )
    raise_first(list(refused.values()))
    taxa = {k: np.asarray(store.taxa[k], np.int64) for k in bundle.task_keys}
    targets, known = _mapped(bundle, taxa)
    table = SampleTable(rows=rows, targets=targets, meta=store.meta, meta_valid=store.meta_valid, paths=paths)
    return EvalSet(str(labels), set_id("labels", store.fingerprint, rows), table, taxa, known, store.observation_ids)


def image_batches(
    predictor: Any,
    table: SampleTable,
    *,
    batch_size: int = 64,
    workers: int = 0,
    masked: bool = False,
    progress: bool = True,
    desc: str = "evaluate",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images (B, 3, S, S), metadata (B, D)) of ``table``'s rows in order, decoded and cropped by the
    validation dataset (``FileDataset``) in ``workers`` loader processes. ``masked``: every metadata component
    zeroed (validation's ``val_mask_meta``)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from linnaeus.data.dataset import FileDataset

    spec = data_spec(predictor.cfg)
    crop = spec.crop
    dataset = FileDataset(
        table,
        img_size=crop.img_size,
        train=False,
        rrc_scale=crop.rrc_scale,
        rrc_ratio=crop.rrc_ratio,
        val_crop_pct=crop.val_crop_pct,
        allow_missing=False,
        seed=spec.seed,
        decode="cpu",
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=dataset.collate_fn,
        pin_memory=predictor.device.type == "cuda",
    )
    with tqdm(total=len(dataset), desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
        for batch in loader:
            meta = batch["meta"]
            yield batch["image"], torch.zeros_like(meta) if masked else meta
            bar.update(len(batch["image"]))


def score(
    predictor: Any,
    evalset: EvalSet,
    *,
    batch_size: int = 64,
    workers: int = 0,
    masked: bool = False,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict[str, np.ndarray]:
    """Uncalibrated log-probabilities per task key, (N, K) float32, in the set's row order (see
    :func:`image_batches` for the arguments)."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in predictor.task_keys}
    batches = image_batches(
        predictor,
        evalset.table,
        batch_size=batch_size,
        workers=workers,
        masked=masked,
        progress=progress,
        desc=desc,
    )
    for images, meta in batches:
        lp = predictor.raw_log_probs(images, meta)
        for k in out:
            out[k].append(lp[k].numpy())
    return {k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in out.items()}
