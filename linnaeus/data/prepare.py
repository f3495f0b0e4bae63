"""From a Config to everything the trainer needs about the data: ``prepare_data(cfg) -> PreparedData``.

Steps, each failing with one line naming the file/key/row: resolve the labels path(s) → read and validate
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

import hashlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from linnaeus.data.labels import FilterReport, LabelStore, components_from_config, filters_from_config
from linnaeus.data.paths import (  # IMAGE_SUFFIXES, image_path, label_paths: also importable from here
    IMAGE_SUFFIXES,
    IMAGES_DIR_UNSET,
    image_path,
    images_dir_problem,
    label_paths,
    resolve_image_paths,
    resolve_path,
)
from linnaeus.data.rules import (
    empty_rank_problems,
    num_classes_problems,
    raise_first,
    split_problems,
    storage_problems,
    task_key_problems,
)
from linnaeus.data.samples import SampleTable
from linnaeus.data.splits import SPLIT_FILE, Split, check_saved, random_split
from linnaeus.data.taxonomy import (
    ClassMap,
    Conflict,
    Inconsistency,
    TaxonomyTree,
    keys_coarse_to_fine,
    label_inconsistencies,
    rank_name,
)
from linnaeus.data.verify_images import verify_images
from linnaeus.errors import ConfigError, DataError
from linnaeus.utils.io import atomic_write_json

if TYPE_CHECKING:
    from linnaeus.config import Config

log = logging.getLogger(__name__)


@dataclass
class SplitView:
    """One split: the store its rows index, and the rows (ascending file rows)."""

    name: str
    store: LabelStore
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


# ---------------------------------------------------------------------------------------- reusable stages
def load_stores(cfg: Config) -> tuple[LabelStore, LabelStore]:
    """(train store, val store); the same object when one file is split by seed."""
    raise_first(storage_problems(cfg) + task_key_problems(cfg))  # config rules first, before any reading
    train_path, val_path = label_paths(cfg)
    train = LabelStore.from_config(train_path, cfg)
    return train, (LabelStore.from_config(val_path, cfg) if val_path else train)


def make_split(
    cfg: Config, train_store: LabelStore, val_store: LabelStore, split_file: Path | None = None
) -> tuple[Split, list[FilterReport]]:
    rows, report = filters_from_config(train_store, cfg)
    reports = [report]
    h5 = cfg.DATA.H5
    if val_store is not train_store:
        val_rows, val_report = filters_from_config(val_store, cfg)
        reports.append(val_report)
        split = Split(rows, val_rows, h5.TRAIN_VAL_SPLIT_SEED, 1.0, combined_fingerprint(train_store, val_store), True)
        allowed = (rows, val_rows)
    else:
        tr, va = random_split(rows, h5.TRAIN_VAL_SPLIT_RATIO, h5.TRAIN_VAL_SPLIT_SEED)
        split = Split(tr, va, h5.TRAIN_VAL_SPLIT_SEED, h5.TRAIN_VAL_SPLIT_RATIO, train_store.fingerprint, False)
        allowed = (rows, rows)
    if split_file is not None and Path(split_file).is_file():
        saved = Split.load(Path(split_file))
        check_saved(saved, split.fingerprint, allowed[0], allowed[1], Path(split_file))
        split = saved
    return split, reports


def combined_fingerprint(train_store: LabelStore, val_store: LabelStore) -> str:
    if train_store is val_store:
        return train_store.fingerprint
    return hashlib.sha256(f"{train_store.fingerprint}\n{val_store.fingerprint}".encode()).hexdigest()


def used_taxa(views: list[SplitView], task_keys: list[str]) -> dict[str, np.ndarray]:
    """Taxon ids of all rows in use (every view), concatenated per key."""
    out = {}
    for key in task_keys:
        parts = [v.store.taxa[key][v.rows] for v in views]
        out[key] = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return out


def per_store(views: list[SplitView]) -> list[tuple[LabelStore, np.ndarray]]:
    """Distinct stores with the union of their rows in use (one entry when train and val share a file)."""
    merged: dict[int, tuple[LabelStore, list[np.ndarray]]] = {}
    for v in views:
        merged.setdefault(id(v.store), (v.store, []))[1].append(v.rows)
    return [(s, np.unique(np.concatenate(parts))) for s, parts in merged.values()]


@dataclass
class TaxonomyFindings:
    tree: TaxonomyTree | None
    conflicts: list[tuple[str, Conflict]] = field(default_factory=list)  # (where, conflict)
    inconsistencies: list[tuple[str, Inconsistency]] = field(default_factory=list)  # (file, inconsistency)

    def lines(self) -> list[str]:
        return [c.line(w) for w, c in self.conflicts] + [i.line(w) for w, i in self.inconsistencies]


def examine_taxonomy(cfg: Config, views: list[SplitView]) -> TaxonomyFindings:
    """Load or infer the tree and collect every conflict/inconsistency (nothing raised for those)."""
    keys = list(cfg.DATA.TASK_KEYS_H5)
    stores = per_store(views)
    if cfg.DATA.TAXONOMY_PATH:
        tree = TaxonomyTree.from_json(resolve_path(cfg.DATA.TAXONOMY_PATH))
        name = tree.source
        findings = TaxonomyFindings(tree)
    else:
        where = ", ".join(str(s.path) for s, _ in stores)
        tree, conflicts = TaxonomyTree.infer(used_taxa(views, keys), where)
        findings = TaxonomyFindings(tree, [(where, c) for c in conflicts])
        name = "the taxonomy inferred from the other rows"
        if conflicts:
            return findings  # row checks against a tree with unresolved parents would only repeat the conflicts
    for store, rows in stores:
        taxa = {k: store.taxa[k][rows] for k in keys}
        for inc in label_inconsistencies(tree, taxa, rows, tree_name=name):
            findings.inconsistencies.append((str(store.path), inc))
    return findings


def build_taxonomy(cfg: Config, views: list[SplitView]) -> TaxonomyTree:
    findings = examine_taxonomy(cfg, views)
    hint = "fix the labels or taxonomy" if cfg.DATA.TAXONOMY_PATH else "fix the labels or set DATA.TAXONOMY_PATH"
    raise_first(findings.lines(), hint)
    assert findings.tree is not None
    return findings.tree


def build_class_maps(
    task_keys: list[str], taxa: dict[str, np.ndarray], tree: TaxonomyTree | None
) -> dict[str, ClassMap]:
    return {k: ClassMap.from_ids(k, [taxa[k]], tree) for k in task_keys}


def where_rows(views: list[SplitView]) -> str:
    """The labels file(s) the rows in use come from, for problem lines."""
    return ", ".join(str(s.path) for s, _ in per_store(views))


def split_image_paths(cfg: Config, view: SplitView) -> tuple[list[str], dict[int, str]]:
    """(image paths, refused identifiers) of a split's rows; see :func:`linnaeus.data.paths.resolve_image_paths`."""
    hybrid = cfg.DATA.HYBRID
    if not hybrid.IMAGES_DIR:
        raise ConfigError(IMAGES_DIR_UNSET)
    return resolve_image_paths(
        resolve_path(hybrid.IMAGES_DIR),
        view.store.identifiers[view.rows],
        view.rows,
        hybrid.FILE_EXTENSION,
        labels_path=view.store.path,
        allow_symlinks_outside=hybrid.ALLOW_SYMLINKS_OUTSIDE,
    )


# ------------------------------------------------------------------------------------------------- result
@dataclass
class PreparedData:
    cfg: Config
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
        v = self.view(split)
        return {k: self.class_maps[k].index(v.store.taxa[k][v.rows]) for k in self.task_keys}

    def class_counts(self, split: str = "train") -> dict[str, np.ndarray]:
        """Per task key: (K,) int64 samples per class in the split (nulls not counted)."""
        out = {}
        for k, t in self.targets(split).items():
            out[k] = np.bincount(t[t >= 0], minlength=self.num_classes[k]).astype(np.int64)
        return out

    def image_paths(self, split: str) -> list[str]:
        """Image file of every row of the split; refuses identifiers that leave DATA.HYBRID.IMAGES_DIR."""
        if split not in self._image_paths:
            paths, refused = split_image_paths(self.cfg, self.view(split))
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
        for ``linnaeus.data.device_decode`` (``"worker"``: that plan decoded by it in the workers)."""
        from linnaeus.data.dataset import FileDataset

        cfg = self.cfg
        return FileDataset(
            self.samples(split),
            img_size=cfg.DATA.IMG_SIZE,
            train=train,
            rrc_scale=tuple(cfg.AUG.RRC_SCALE),
            rrc_ratio=tuple(cfg.AUG.RRC_RATIO),
            val_crop_pct=cfg.DATA.VAL_CROP_PCT,
            allow_missing=cfg.DATA.HYBRID.ALLOW_MISSING_IMAGES,
            seed=cfg.MISC.SEED,
            decode=decode,
        )

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
        if self.image_report is not None and not self.cfg.DATA.HYBRID.VERIFY_IMAGES.REPORT_PATH:
            atomic_write_json(run_dir / "image_verification.json", self.image_report)


def compute_stats(
    task_keys: list[str],
    class_maps: dict[str, ClassMap],
    train: SplitView,
    val: SplitView,
    reports: list[FilterReport],
    fingerprint: str,
    tree: TaxonomyTree | None,
) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    counts: dict[str, dict[str, np.ndarray]] = {}
    for v in (train, val):
        s = v.store.statistics(v.rows)
        counts[v.name] = {}
        s["class_counts"] = {}
        for k in task_keys:
            idx = class_maps[k].index(v.store.taxa[k][v.rows])
            c = np.bincount(idx[idx >= 0], minlength=len(class_maps[k]))
            counts[v.name][k] = c
            s["class_counts"][k] = c.tolist()
        splits[v.name] = s
    stores = per_store([train, val])
    return {
        "fingerprint": fingerprint,
        "labels": [r.to_dict() for r in reports],
        "num_classes": {k: len(class_maps[k]) for k in task_keys},
        "classes_without_train_rows": {k: int((counts["train"][k] == 0).sum()) for k in task_keys},
        "splits": splits,
        "duplicate_identifiers": {
            str(s.path): {"rows": s.duplicates.count, "examples": s.duplicates.examples} for s, _ in stores
        },
        "taxonomy": None if tree is None else {"source": tree.source, "nodes": len(tree), "edges": len(tree.parent)},
    }


def prepare_data(
    cfg: Config,
    *,
    split_file: Path | None = None,
    check_images: bool = True,
    share: Callable[[Any], Any] | None = None,
) -> PreparedData:
    """Read, validate, filter, split and describe the data of ``cfg``. See the module docstring.

    ``split_file``: a saved split.npz to reuse (resume); ignored when it does not exist yet.
    ``check_images``: False skips DATA.HYBRID.VERIFY_IMAGES (e.g. on every process but the main one).
    ``share``: in a multi-process job, a broadcast of a picklable value from the main process (called by every
    process, the main one with its value, the others with None). Image verification then scans once, on the process
    with ``check_images``, and every process leaves out exactly the rows it found (or raises its error).
    """
    task_keys = list(cfg.DATA.TASK_KEYS_H5)
    train_store, val_store = load_stores(cfg)
    split, reports = make_split(cfg, train_store, val_store, split_file)
    raise_first(split_problems(split))
    train = SplitView("train", train_store, split.train_rows)
    val = SplitView("val", val_store, split.val_rows)
    for store, _ in per_store([train, val]):
        if store.duplicates.count:
            log.warning("%s", store.duplicates.line(store.path))
    tree = build_taxonomy(cfg, [train, val])
    class_maps = build_class_maps(task_keys, used_taxa([train, val], task_keys), tree)
    where = where_rows([train, val])
    raise_first(num_classes_problems(cfg, class_maps, where) + empty_rank_problems(class_maps, where))
    fingerprint = split.fingerprint
    comps = components_from_config(cfg)
    filter_report = {
        "files": [r.to_dict() for r in reports],
        "rows_total": sum(r.rows_total for r in reports),
        "rows_kept": sum(r.rows_kept for r in reports),
    }
    data = PreparedData(
        cfg=cfg,
        task_keys=task_keys,
        class_maps=class_maps,
        num_classes={k: len(m) for k, m in class_maps.items()},
        tree=tree,
        meta_components=[c.name for c in comps],
        meta_dims=[c.dim for c in comps],
        train=train,
        val=val,
        split=split,
        filter_report=filter_report,
        stats=compute_stats(task_keys, class_maps, train, val, reports, fingerprint, tree),
        fingerprint=fingerprint,
    )
    if cfg.DATA.HYBRID.IMAGES_DIR:  # identifiers that leave the image folder are refused now, on every process
        problem = images_dir_problem(cfg)  # the same rule as `linnaeus check`: before any model is built
        if problem:
            raise ConfigError(problem)
        for name in ("train", "val"):
            data.image_paths(name)
    verify = cfg.DATA.HYBRID.VERIFY_IMAGES
    # Leaving rows out must happen on every process (each builds its own dataset): alone, a process scans for itself;
    # in a job, the main process scans and shares its verdict so every process keeps the same rows.
    excludes = not cfg.DATA.HYBRID.ALLOW_MISSING_IMAGES and (verify.MAX_MISSING_COUNT or verify.MAX_MISSING_RATIO)
    scans = check_images or (excludes and share is None)
    if verify.ENABLED and (scans or share is not None):
        verdict = _verify_split_images(data, cfg, report=check_images) if scans else None
        if share is not None:
            verdict = share(verdict)
        if verdict["error"]:
            raise DataError(verdict["error"])
        if verdict["bad"]:
            _leave_out(data, set(verdict["bad"]))
            data.stats = compute_stats(task_keys, class_maps, data.train, data.val, reports, fingerprint, tree)
            if data.image_report is not None:
                data.stats["images"] = {k: v for k, v in data.image_report.items() if k != "items"}
            log.warning(
                "%d rows with missing or corrupt images left out (DATA.HYBRID.VERIFY_IMAGES limits)",
                len(verdict["bad"]),
            )
    return data


def _verify_split_images(data: PreparedData, cfg: Config, report: bool) -> dict[str, Any]:
    """Scan both splits' images: {"error": one line or None, "bad": image paths whose rows are to be left out}."""
    verify = cfg.DATA.HYBRID.VERIFY_IMAGES
    paths, rows, ids = [], [], []
    for name in ("train", "val"):
        v = data.view(name)
        paths += data.image_paths(name)
        rows.append(v.rows)
        ids.append(v.store.identifiers[v.rows])
    found = verify_images(
        paths,
        np.concatenate(rows),
        np.concatenate(ids),
        verify,
        report_path_of(cfg) if report else None,
        allow_missing=cfg.DATA.HYBRID.ALLOW_MISSING_IMAGES,
        raise_on_error=False,
    )
    if report:
        data.image_report = found
        data.stats["images"] = {k: v for k, v in found.items() if k != "items"}
    bad = sorted({item["path"] for item in found["items"]}) if found["excluded_rows"] else []
    return {"error": found["error"], "bad": bad}


def _leave_out(data: PreparedData, bad: set[str]) -> None:
    """Drop the rows whose image is in ``bad`` from both splits, with their cached paths (rows and paths stay
    aligned)."""
    for name in ("train", "val"):
        paths = data.image_paths(name)
        keep = np.array([p not in bad for p in paths], dtype=bool)
        view = data.view(name)
        setattr(data, name, SplitView(name, view.store, view.rows[keep]))
        data._image_paths[name] = [p for p, k in zip(paths, keep, strict=True) if k]


def report_path_of(cfg: Config) -> Path | None:
    """DATA.HYBRID.VERIFY_IMAGES.REPORT_PATH with '{output_dir}' replaced by the run folder (None: unset)."""
    value = cfg.DATA.HYBRID.VERIFY_IMAGES.REPORT_PATH
    if not value:
        return None
    return resolve_path(value.replace("{output_dir}", str(cfg.EXPERIMENT.run_folder())))


__all__ = [
    "IMAGE_SUFFIXES",
    "PreparedData",
    "SplitView",
    "TaxonomyFindings",
    "build_class_maps",
    "build_taxonomy",
    "examine_taxonomy",
    "image_path",
    "label_paths",
    "load_stores",
    "make_split",
    "per_store",
    "prepare_data",
    "resolve_path",
    "split_image_paths",
    "where_rows",
]
