"""The data pipeline, written once: ``data_stages(spec)`` lists the stages in order; two consumers run them.

- training (:func:`linnaeus.data.prepare.prepare_data`) raises the first problem a stage finds;
- ``linnaeus check`` (:func:`linnaeus.data.check.build_report`) collects every problem and carries on wherever the
  later stages can still say something useful.

Order: storage rules → inspect_labels → make_split → split_problems → observations → examine_taxonomy → build_class_maps →
num_classes_problems → split_image_paths → verify_images. Each stage reads and fills a :class:`DataState` and hands
its problems (one line each) to a :class:`Sink`, which raises (training) or lists (check). A stage marked ``gated``
needs what the stages before it built: once anything was found, check stops there (training never gets that far).

Class counts are computed here once (:func:`class_counts`): the stats, ``check``'s rank table and
``PreparedData.class_counts`` all use it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from linnaeus.data.labels import FilterReport, LabelStore, apply_filters, inspect_labels
from linnaeus.data.observations import disagreements, grouped_split, observation_stats
from linnaeus.data.paths import IMAGES_DIR_UNSET, images_dir_problem, label_paths, resolve_image_paths, resolve_path
from linnaeus.data.rules import (
    Problem,
    empty_rank_problems,
    num_classes_problems,
    raise_first,
    split_problems,
    storage_problems,
    task_key_problems,
)
from linnaeus.data.splits import Split, check_saved, random_split
from linnaeus.data.taxonomy import (
    ClassMap,
    Conflict,
    Inconsistency,
    TaxonomyTree,
    keys_coarse_to_fine,
    label_inconsistencies,
)
from linnaeus.data.verify_images import verify_images
from linnaeus.errors import ConfigError, DataError, LinnaeusError
from linnaeus.specs.data import DataSpec, ImageSpec

log = logging.getLogger(__name__)

MAX_LISTED = 100  # image problems listed in a check report (all are counted)


@dataclass
class SplitView:
    """One split: the store its rows index, and the rows (ascending file rows)."""

    name: str
    store: LabelStore
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class TaxonomyFindings:
    tree: TaxonomyTree | None
    conflicts: list[tuple[str, Conflict]] = field(default_factory=list)  # (where, conflict)
    inconsistencies: list[tuple[str, Inconsistency]] = field(default_factory=list)  # (file, inconsistency)

    def lines(self) -> list[str]:
        return [c.line(w) for w, c in self.conflicts] + [i.line(w) for w, i in self.inconsistencies]


# -------------------------------------------------------------------------------------------------- helpers
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


def where_rows(views: list[SplitView]) -> str:
    """The labels file(s) the rows in use come from, for problem lines."""
    return ", ".join(str(s.path) for s, _ in per_store(views))


def build_class_maps(
    task_keys: list[str], taxa: dict[str, np.ndarray], tree: TaxonomyTree | None
) -> dict[str, ClassMap]:
    return {k: ClassMap.from_ids(k, [taxa[k]], tree) for k in task_keys}


def split_targets(class_maps: dict[str, ClassMap], view: SplitView) -> dict[str, np.ndarray]:
    """Per task key: the split's class indices (-1 null)."""
    return {k: m.index(view.store.taxa[k][view.rows]) for k, m in class_maps.items()}


def class_counts(class_maps: dict[str, ClassMap], view: SplitView) -> dict[str, np.ndarray]:
    """Per task key: (K,) int64 samples per class in the split (nulls not counted). The one count of classes."""
    return {
        k: np.bincount(t[t >= 0], minlength=len(class_maps[k])).astype(np.int64)
        for k, t in split_targets(class_maps, view).items()
    }


def filter_rows(spec: DataSpec, store: LabelStore) -> tuple[np.ndarray, FilterReport]:
    f = spec.filters
    return apply_filters(store, in_region_only=f.in_region_only, require_all_ranks=f.require_all_ranks)


def make_split(
    spec: DataSpec, train_store: LabelStore, val_store: LabelStore, split_file: Path | None = None
) -> tuple[Split, list[FilterReport]]:
    rows, report = filter_rows(spec, train_store)
    reports = [report]
    s = spec.split
    if val_store is not train_store:
        val_rows, val_report = filter_rows(spec, val_store)
        reports.append(val_report)
        split = Split(rows, val_rows, s.seed, 1.0, combined_fingerprint(train_store, val_store), True)
        allowed = (rows, val_rows)
    else:
        split = draw_split(spec, train_store, rows)
        allowed = (rows, rows)
    if split_file is not None and Path(split_file).is_file():
        saved = Split.load(Path(split_file))
        check_saved(saved, split.fingerprint, allowed[0], allowed[1], Path(split_file))
        if (saved.by, saved.stratify) != (split.by, split.stratify):
            log.warning(
                "%s was drawn %s; the config now asks for %s; the saved split is kept (resume)",
                split_file,
                saved.describe(),
                split.describe(),
            )
        split = saved
    return split, reports


def draw_split(spec: DataSpec, store: LabelStore, rows: np.ndarray) -> Split:
    """One labels file's surviving ``rows`` split by seed: by observation when asked and the file has
    ``observation_ids`` (else by row), optionally stratified by the finest configured rank."""
    s = spec.split
    codes = store.observation_codes
    by = "observation" if s.by == "observation" and codes is not None else "row"
    stratify = keys_coarse_to_fine(spec.task_keys)[-1] if s.stratify else ""
    if by == "row" and not stratify:
        tr, va = random_split(rows, s.ratio, s.seed)
    else:
        groups = codes[rows] if by == "observation" and codes is not None else rows
        strata = store.taxa[stratify][rows] if stratify else None
        tr, va = grouped_split(rows, groups, s.ratio, s.seed, strata)
    return Split(tr, va, s.seed, s.ratio, store.fingerprint, False, by=by, stratify=stratify)


def examine_taxonomy(spec: DataSpec, views: list[SplitView]) -> TaxonomyFindings:
    """Load or infer the tree and collect every conflict/inconsistency (nothing raised for those)."""
    keys = spec.task_keys
    stores = per_store(views)
    if spec.labels.taxonomy_path:
        tree = TaxonomyTree.from_json(resolve_path(spec.labels.taxonomy_path))
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


def split_image_paths(images: ImageSpec, view: SplitView) -> tuple[list[str], dict[int, str]]:
    """(image paths, refused identifiers) of a split's rows; see :func:`linnaeus.data.paths.resolve_image_paths`."""
    if not images.images_dir:
        raise ConfigError(IMAGES_DIR_UNSET)
    return resolve_image_paths(
        resolve_path(images.images_dir),
        view.store.identifiers[view.rows],
        view.rows,
        images.file_extension,
        labels_path=view.store.path,
        allow_symlinks_outside=images.allow_symlinks_outside,
    )


def verify_report_path(images: ImageSpec) -> Path | None:
    """DATA.HYBRID.VERIFY_IMAGES.REPORT_PATH ('{output_dir}' already replaced), resolved; None when unset."""
    value = images.verify.report_path
    return resolve_path(value) if value else None


# ------------------------------------------------------------------------------------------- state and sink
@dataclass(frozen=True)
class StageOptions:
    """How a consumer runs the stages (everything that is not in the spec)."""

    collect: bool = False  # True: list every problem (check); False: raise the first (training)
    split_file: Path | None = None  # training: a saved split.npz to reuse (resume)
    check_images: bool = True  # training: VERIFY_IMAGES scans here; check: the image files are verified
    decode: bool = False  # check: decode every image whatever VERIFY_IMAGES.DECODE says
    # training, in a job: broadcast a picklable value from the main process (see ``prepare_data``)
    share: Callable[[Any], Any] | None = None


class Sink:
    """Where stages put problems and warnings: raised (training) or listed (check)."""

    def __init__(self, collect: bool) -> None:
        self.collect = collect
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def add(self, problems: Sequence[Problem | str], hint: str = "") -> None:
        if not self.collect:
            raise_first(problems, hint)
        self.errors.extend(map(str, problems))

    def warn(self, line: str) -> None:
        if self.collect:
            self.warnings.append(line)
        else:
            log.warning("%s", line)


@dataclass
class DataState:
    """What the stages build, in order; a consumer reads what it needs once they ran."""

    spec: DataSpec
    options: StageOptions
    stores: list[LabelStore] = field(default_factory=list)  # one per labels file
    split: Split | None = None
    reports: list[FilterReport] = field(default_factory=list)
    views: list[SplitView] = field(default_factory=list)  # [train, val]
    findings: TaxonomyFindings | None = None
    tree: TaxonomyTree | None = None  # None in check when the taxonomy has conflicts (or failed to load)
    class_maps: dict[str, ClassMap] = field(default_factory=dict)
    counts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # split -> key -> (K,) class counts
    image_paths: dict[str, list[str]] = field(default_factory=dict)  # split -> image path of every row
    refused: dict[str, dict[int, str]] = field(default_factory=dict)  # split -> {index: line} (check only)
    image_report: dict[str, Any] | None = None
    observations: list[dict[str, Any]] = field(default_factory=list)  # per labels file with observation_ids
    excluded_images: list[str] = field(default_factory=list)  # training: images whose rows are left out
    warnings_before: dict[str, int] = field(default_factory=dict)  # stage name -> warnings listed before it ran

    def view(self, name: str) -> SplitView:
        return self.views[0] if name == "train" else self.views[1]


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[DataState, Sink], None]
    gated: bool = False  # runs only while no problem was found (it needs what the stages before it built)


# ----------------------------------------------------------------------------------------------- the stages
def _storage_rules(state: DataState, sink: Sink) -> None:
    spec = state.spec
    sink.add(storage_problems(spec.images) + task_key_problems(spec.task_keys))  # config rules, before any reading
    if spec.observations.enabled and spec.shards.enabled:
        sink.add(
            [
                Problem(
                    "DATA.OBSERVATIONS.ENABLED and DATA.SHARDS.ENABLED: shards hold one image per sample, not"
                    " observations; turn one of them off",
                    ConfigError,
                )
            ]
        )
    label_paths(spec.labels)  # raises its one line: which labels keys are set wrongly


def _inspect_labels(state: DataState, sink: Sink) -> None:
    spec = state.spec
    train_path, val_path = label_paths(spec.labels)
    for path in [train_path] + ([val_path] if val_path else []):
        store, problems = inspect_labels(path, spec.task_keys, list(spec.meta.components), spec.in_region_key)
        sink.add(problems)
        state.stores.append(store)


def _make_split(state: DataState, sink: Sink) -> None:
    train_store, val_store = state.stores[0], state.stores[-1]
    state.split, state.reports = make_split(state.spec, train_store, val_store, state.options.split_file)
    state.views = [
        SplitView("train", train_store, state.split.train_rows),
        SplitView("val", val_store, state.split.val_rows),
    ]


def _split_problems(state: DataState, sink: Sink) -> None:
    assert state.split is not None
    sink.add(split_problems(state.split))
    for store, _ in per_store(state.views):
        if store.duplicates.count:
            sink.warn(store.duplicates.line(store.path))


def describe_observations(
    store: LabelStore, rows: np.ndarray, task_keys: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """Observations among ``rows`` of a store with ``observation_ids``: counts, views per observation, and one line
    per observation whose photos disagree on a label (per task key) or a metadata component (rows named)."""
    assert store.observation_ids is not None and store.observation_codes is not None
    codes = store.observation_codes[rows]
    stats = observation_stats(codes)
    columns: dict[str, np.ndarray] = {k: store.taxa[k][rows] for k in task_keys}
    for name, cols in store.meta_slices().items():
        columns[name] = store.meta[rows, cols]
    lines = [f"{store.path}: {line}" for line in disagreements(store.observation_ids[rows], codes, rows, columns)]
    info = {
        "path": str(store.path),
        "observations": stats.observations,
        "views_min": stats.views_min,
        "views_median": stats.views_median,
        "views_max": stats.views_max,
        "disagreeing": len(lines),
        "line": stats.line(),
    }
    return info, lines


def _observations(state: DataState, sink: Sink) -> None:
    """Photos of one observation should agree on labels and metadata; each observation whose rows do not is one
    warning (a multi-view sample takes its first row's labels and metadata). Multi-view samples need the ids."""
    for store, rows in per_store(state.views):
        if store.observation_ids is None:
            if state.spec.observations.enabled:
                sink.add(
                    [
                        f"DATA.OBSERVATIONS.ENABLED needs dataset 'observation_ids' (N,) integers or strings,"
                        f" which {store.path} does not have"
                    ]
                )
            continue
        info, lines = describe_observations(store, rows, state.spec.task_keys)
        state.observations.append(info)
        for line in lines:
            sink.warn(line)


def _examine_taxonomy(state: DataState, sink: Sink) -> None:
    findings = examine_taxonomy(state.spec, state.views)
    state.findings = findings
    hint = (
        "fix the labels or taxonomy" if state.spec.labels.taxonomy_path else "fix the labels or set DATA.TAXONOMY_PATH"
    )
    sink.add(findings.lines(), hint)
    state.tree = None if findings.conflicts else findings.tree


def _build_class_maps(state: DataState, sink: Sink) -> None:
    keys = state.spec.task_keys
    state.class_maps = build_class_maps(keys, used_taxa(state.views, keys), state.tree)
    state.counts = {v.name: class_counts(state.class_maps, v) for v in state.views}


def _num_classes_problems(state: DataState, sink: Sink) -> None:
    where = where_rows(state.views)
    sink.add(
        num_classes_problems(state.spec.labels, state.class_maps, where) + empty_rank_problems(state.class_maps, where)
    )


def _split_image_paths(state: DataState, sink: Sink) -> None:
    """Identifiers that leave IMAGES_DIR are refused now, before any model is built (training raises, check lists).

    Training needs a set IMAGES_DIR to be a folder (an unset one is the trainer's error); check asks for the folder
    only when it verifies the images, so labels can be checked where the images are not."""
    images = state.spec.images
    problem = images_dir_problem(images)
    needs_folder = state.options.check_images if sink.collect else bool(images.images_dir)
    if problem and needs_folder:
        sink.add([Problem(problem, ConfigError)])
        return
    if not images.images_dir:
        return
    for v in state.views:
        paths, refused = split_image_paths(images, v)
        sink.add(list(refused.values()))
        state.image_paths[v.name], state.refused[v.name] = paths, refused


def _scan_images(state: DataState, report_path: Path | None, decode: bool | None) -> dict[str, Any]:
    """``verify_images`` over both splits' image files (a refused path is never opened)."""
    images = state.spec.images
    if not state.image_paths:
        raise ConfigError(IMAGES_DIR_UNSET)
    paths, rows, ids = [], [], []
    for v in state.views:
        refused = state.refused.get(v.name, {})
        keep = np.setdiff1d(np.arange(len(v.rows)), np.fromiter(refused, np.int64))
        split_paths = state.image_paths[v.name]
        paths += [split_paths[j] for j in keep]
        rows.append(v.rows[keep])
        ids.append(v.store.identifiers[v.rows[keep]])
    return verify_images(
        paths,
        np.concatenate(rows),
        np.concatenate(ids),
        images.verify,
        report_path,
        allow_missing=images.allow_missing,
        decode=decode,
        raise_on_error=False,
    )


def _verify_images(state: DataState, sink: Sink) -> None:
    if sink.collect:
        _verify_for_check(state, sink)
    else:
        _verify_for_training(state, sink)


def _verify_for_check(state: DataState, sink: Sink) -> None:
    if not state.options.check_images or not state.image_paths:
        return
    decode = state.options.decode or state.spec.images.verify.decode
    report = _scan_images(state, None, decode)
    report["items"] = report["items"][:MAX_LISTED]
    state.image_report = report
    if report["error"]:
        sink.add([report["error"]])
    elif report["excluded_rows"]:
        sink.warn(
            f"{report['excluded_rows']} rows with missing or corrupt images will be left out of training"
            " (within DATA.HYBRID.VERIFY_IMAGES' MAX_MISSING_COUNT/MAX_MISSING_RATIO)"
        )
    elif report["missing"] or report["corrupt"]:
        sink.warn(
            f"{report['missing']} missing and {report['corrupt']} corrupt images will be replaced and counted"
            " (DATA.HYBRID.ALLOW_MISSING_IMAGES)"
        )


def _verify_for_training(state: DataState, sink: Sink) -> None:
    """Leaving rows out must happen on every process (each builds its own dataset): alone, a process scans for
    itself; in a job, the main process scans and shares its verdict so every process keeps the same rows."""
    images, o = state.spec.images, state.options
    verify = images.verify
    excludes = not images.allow_missing and (verify.max_missing_count or verify.max_missing_ratio)
    scans = o.check_images or (excludes and o.share is None)
    if not verify.enabled or not (scans or o.share is not None):
        return
    verdict = None
    if scans:
        found = _scan_images(state, verify_report_path(images) if o.check_images else None, None)
        if o.check_images:
            state.image_report = found
        bad = sorted({item["path"] for item in found["items"]}) if found["excluded_rows"] else []
        verdict = {"error": found["error"], "bad": bad}
    if o.share is not None:
        verdict = o.share(verdict)
    assert verdict is not None
    if verdict["error"]:
        raise DataError(verdict["error"])
    if verdict["bad"]:
        _leave_out(state, set(verdict["bad"]))
        log.warning(
            "%d rows with missing or corrupt images left out (DATA.HYBRID.VERIFY_IMAGES limits)", len(verdict["bad"])
        )


def _leave_out(state: DataState, bad: set[str]) -> None:
    """Drop the rows whose image is in ``bad`` from both splits, with their paths (rows and paths stay aligned);
    the class maps stay, the counts follow the rows."""
    for i, view in enumerate(state.views):
        paths = state.image_paths[view.name]
        keep = np.array([p not in bad for p in paths], dtype=bool)
        state.views[i] = SplitView(view.name, view.store, view.rows[keep])
        state.image_paths[view.name] = [p for p, k in zip(paths, keep, strict=True) if k]
    state.counts = {v.name: class_counts(state.class_maps, v) for v in state.views}
    state.excluded_images = sorted(bad)


def data_stages(spec: DataSpec) -> list[Stage]:
    """The data pipeline in order (the same stages for every ``spec`` today; each reads it from its state)."""
    return [
        Stage("storage rules", _storage_rules),
        Stage("inspect_labels", _inspect_labels, gated=True),
        Stage("make_split", _make_split, gated=True),
        Stage("split_problems", _split_problems, gated=True),
        Stage("observations", _observations),
        Stage("examine_taxonomy", _examine_taxonomy),
        Stage("build_class_maps", _build_class_maps),
        Stage("num_classes_problems", _num_classes_problems),
        Stage("split_image_paths", _split_image_paths),
        Stage("verify_images", _verify_images),
    ]


def run_stages(spec: DataSpec, options: StageOptions) -> tuple[DataState, Sink]:
    """Run ``data_stages(spec)``: training (``options.collect`` False) raises the first problem; check collects
    them (a stage that raises becomes one line) and stops before a gated stage once anything was found."""
    state, sink = DataState(spec, options), Sink(options.collect)
    for stage in data_stages(spec):
        if stage.gated and sink.errors:
            break
        state.warnings_before[stage.name] = len(sink.warnings)
        try:
            stage.run(state, sink)
        except LinnaeusError as exc:
            if not sink.collect:
                raise
            sink.add([str(exc)])
    return state, sink


__all__ = [
    "DataState",
    "Sink",
    "SplitView",
    "Stage",
    "StageOptions",
    "TaxonomyFindings",
    "build_class_maps",
    "class_counts",
    "data_stages",
    "describe_observations",
    "draw_split",
    "examine_taxonomy",
    "make_split",
    "per_store",
    "run_stages",
    "split_image_paths",
    "used_taxa",
    "where_rows",
]
