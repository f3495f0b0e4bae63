"""From a ``DataSpec`` to everything the trainer needs about the data: ``prepare_data(spec) -> PreparedData``.

The steps are :func:`linnaeus.data.stages.data_stages`, run so that the first problem raises (``linnaeus check``
runs the same stages and lists every problem). Each fails with one line naming the file/key/row: resolve the labels
path(s) → read and validate
labels.h5 (LabelStore) → explicit filters (counted) → split (seeded, or reloaded from the run's split.npz; both
splits non-empty) → taxonomy (taxonomy.json checked against the labels, or inferred with conflicts refused) →
class maps over the rows in use (train ∪ val) → NUM_CLASSES checked or inferred → image paths (identifiers must
stay inside IMAGES_DIR) → optional image verification → statistics. Every check is a rule from
:mod:`linnaeus.data.rules` (or a module it names) raised with ``raise_first``; ``linnaeus check`` lists them all.

Class maps are built from the rows that survive the filters, so no class gets an output slot only because of
rows a filter removed. A class seen only in validation rows still gets one (its validation samples must be
scorable); such classes are counted in ``stats["classes_without_train_rows"]``.

Relative paths in the config (labels, taxonomy, images, report) are resolved against the current directory.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from linnaeus.data.labels import FilterReport
from linnaeus.data.paths import (  # IMAGE_SUFFIXES, image_path, label_paths: also importable from here
    IMAGE_SUFFIXES,
    image_path,
    label_paths,
    resolve_path,
)
from linnaeus.data.rules import raise_first
from linnaeus.data.samples import SampleTable
from linnaeus.data.splits import SPLIT_FILE, Split
from linnaeus.data.stages import (
    DataState,
    SplitView,
    StageOptions,
    class_counts,
    per_store,
    run_stages,
    split_image_paths,
    split_targets,
)
from linnaeus.data.taxonomy import ClassMap, TaxonomyTree, keys_coarse_to_fine, rank_name
from linnaeus.specs.data import DataSpec
from linnaeus.utils.io import atomic_write_json


# ------------------------------------------------------------------------------------------------- result
@dataclass
class PreparedData:
    spec: DataSpec
    task_keys: list[str]  # config order (DATA.TASK_KEYS_H5)
    class_maps: dict[str, ClassMap]
    num_classes: dict[str, int]
    tree: TaxonomyTree
    meta_components: list[str]  # IDX order
    meta_dims: list[int]
    train: SplitView
    val: SplitView
    split: Split
    filter_report: dict[str, Any]
    stats: dict[str, Any]
    fingerprint: str
    image_report: dict[str, Any] | None = None
    _image_paths: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def view(self, split: str) -> SplitView:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    @property
    def keys_coarse_to_fine(self) -> list[str]:
        return keys_coarse_to_fine(self.task_keys)

    @cached_property
    def _hierarchy(self) -> dict[tuple[str, str], np.ndarray]:
        order = self.keys_coarse_to_fine
        return {
            (p, c): self.tree.hierarchy_matrix(self.class_maps[p], self.class_maps[c])
            for p, c in itertools.pairwise(order)
        }

    def hierarchy_matrices(self) -> dict[tuple[str, str], np.ndarray]:
        """(parent_key, child_key) for adjacent configured ranks → (K_parent, K_child) float32 0/1."""
        return dict(self._hierarchy)

    @cached_property
    def _distances(self) -> dict[str, np.ndarray]:
        return {k: self.tree.distance_matrix(self.class_maps[k].taxon_ids) for k in self.task_keys}

    def distance_matrices(self) -> dict[str, np.ndarray]:
        """Per task key: (K, K) float32 tree distances (edges through the LCA; inf when unrelated)."""
        return dict(self._distances)

    def targets(self, split: str) -> dict[str, np.ndarray]:
        return split_targets(self.class_maps, self.view(split))

    def class_counts(self, split: str = "train") -> dict[str, np.ndarray]:
        """Per task key: (K,) int64 samples per class in the split (nulls not counted)."""
        return class_counts(self.class_maps, self.view(split))

    def image_paths(self, split: str) -> list[str]:
        """Image file of every row of the split; refuses identifiers that leave DATA.HYBRID.IMAGES_DIR."""
        if split not in self._image_paths:
            paths, refused = split_image_paths(self.spec.images, self.view(split))
            raise_first(list(refused.values()))
            self._image_paths[split] = paths
        return list(self._image_paths[split])

    def samples(self, split: str, with_paths: bool = True) -> SampleTable:
        """Everything per sample of a split: rows, targets (-1 null), packed meta, meta_valid, image paths."""
        v = self.view(split)
        return SampleTable(
            rows=v.rows,
            targets=self.targets(split),
            meta=v.store.meta[v.rows],
            meta_valid=v.store.meta_valid[v.rows],
            paths=self.image_paths(split) if with_paths else None,
        )

    def dataset(self, split: str, train: bool, decode: str = "cpu"):
        """A ``FileDataset`` over this split: decode + crop in workers, or (``decode="device"``) bytes + crop plan
        for ``linnaeus.data.device_decode`` (``"worker"``: that plan decoded by it in the workers). With
        ``DATA.OBSERVATIONS.ENABLED`` an ``ObservationDataset`` over it: one sample per observation."""
        from linnaeus.data.dataset import FileDataset

        crop = self.spec.crop
        rows = FileDataset(
            self.samples(split),
            img_size=crop.img_size,
            train=train,
            rrc_scale=crop.rrc_scale,
            rrc_ratio=crop.rrc_ratio,
            val_crop_pct=crop.val_crop_pct,
            allow_missing=self.spec.images.allow_missing,
            seed=self.spec.seed,
            decode=decode,
        )
        obs = self.spec.observations
        if not obs.enabled:
            return rows
        from linnaeus.data.observation_dataset import ObservationDataset

        v = self.view(split)
        codes = v.store.observation_codes
        assert codes is not None  # the observations stage refuses DATA.OBSERVATIONS without observation_ids
        return ObservationDataset(rows, codes[v.rows], views=obs.views, select=obs.select)

    def class_maps_json(self) -> dict[str, Any]:
        return {
            k: {
                "rank_level": int(m.rank),
                "rank": rank_name(m.rank),
                "num_classes": len(m),
                "classes": m.to_json(),
            }
            for k, m in self.class_maps.items()
        }

    def save(self, run_dir: Path) -> None:
        """split.npz, class_maps.json, taxonomy.json, stats.json (+ labels provenance, image report) in run_dir."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.split.save(run_dir / SPLIT_FILE)
        atomic_write_json(run_dir / "class_maps.json", self.class_maps_json())
        self.tree.save(run_dir / "taxonomy.json")
        atomic_write_json(run_dir / "stats.json", self.stats)
        stores = per_store([self.train, self.val])
        atomic_write_json(
            run_dir / "labels_provenance.json",
            [{"path": str(s.path), "fingerprint": s.fingerprint, "config_json": s.config_json} for s, _ in stores],
        )
        if self.image_report is not None and not self.spec.images.verify.report_path:
            atomic_write_json(run_dir / "image_verification.json", self.image_report)


def compute_stats(state: DataState, fingerprint: str) -> dict[str, Any]:
    """stats.json: filters, class counts per split (``state.counts``), duplicates, taxonomy (and images)."""
    keys, class_maps, tree = state.spec.task_keys, state.class_maps, state.tree
    splits: dict[str, Any] = {}
    for v in state.views:
        s = v.store.statistics(v.rows)
        s["class_counts"] = {k: state.counts[v.name][k].tolist() for k in keys}
        splits[v.name] = s
    stores = per_store(state.views)
    stats = {
        "fingerprint": fingerprint,
        "labels": [r.to_dict() for r in state.reports],
        "num_classes": {k: len(class_maps[k]) for k in keys},
        "classes_without_train_rows": {k: int((state.counts["train"][k] == 0).sum()) for k in keys},
        "splits": splits,
        "duplicate_identifiers": {
            str(s.path): {"rows": s.duplicates.count, "examples": s.duplicates.examples} for s, _ in stores
        },
        "taxonomy": None if tree is None else {"source": tree.source, "nodes": len(tree), "edges": len(tree.parent)},
        "split": state.split.describe() if state.split is not None else None,
        "observations": state.observations,
    }
    if state.image_report is not None:
        stats["images"] = {k: v for k, v in state.image_report.items() if k != "items"}
    return stats


def filter_summary(reports: list[FilterReport]) -> dict[str, Any]:
    return {
        "files": [r.to_dict() for r in reports],
        "rows_total": sum(r.rows_total for r in reports),
        "rows_kept": sum(r.rows_kept for r in reports),
    }


def prepare_data(
    spec: DataSpec,
    *,
    split_file: Path | None = None,
    check_images: bool = True,
    share: Callable[[Any], Any] | None = None,
) -> PreparedData:
    """Read, validate, filter, split and describe the data ``spec`` names. See the module docstring.

    ``split_file``: a saved split.npz to reuse (resume); ignored when it does not exist yet.
    ``check_images``: False skips DATA.HYBRID.VERIFY_IMAGES (e.g. on every process but the main one).
    ``share``: in a multi-process job, a broadcast of a picklable value from the main process (called by every
    process, the main one with its value, the others with None). Image verification then scans once, on the process
    with ``check_images``, and every process leaves out exactly the rows it found (or raises its error).
    """
    options = StageOptions(collect=False, split_file=split_file, check_images=check_images, share=share)
    state, _ = run_stages(spec, options)
    assert state.split is not None and state.tree is not None
    comps = spec.meta.components
    train, val = state.views
    return PreparedData(
        spec=spec,
        task_keys=spec.task_keys,
        class_maps=state.class_maps,
        num_classes={k: len(m) for k, m in state.class_maps.items()},
        tree=state.tree,
        meta_components=[c.name for c in comps],
        meta_dims=[c.dim for c in comps],
        train=train,
        val=val,
        split=state.split,
        filter_report=filter_summary(state.reports),
        stats=compute_stats(state, state.split.fingerprint),
        fingerprint=state.split.fingerprint,
        image_report=state.image_report,
        _image_paths=dict(state.image_paths),
    )


__all__ = [
    "IMAGE_SUFFIXES",
    "PreparedData",
    "SplitView",
    "image_path",
    "label_paths",
    "prepare_data",
    "resolve_path",
]
