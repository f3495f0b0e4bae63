"""labels.h5 → an in-memory, validated label store (numpy arrays), plus explicit, counted row filters.

The file is opened once, every dataset the configuration needs is read whole, and the handle is closed before
anything else happens: no h5py handle outlives :meth:`LabelStore.load` (so nothing breaks across a fork) and
nothing reads row by row.

Schema (see docs/design.md and the architecture spec):

- ``img_identifiers`` (N,) strings: image file names relative to ``DATA.HYBRID.IMAGES_DIR``.
- ``taxa_LXX`` (N,) integer taxon ids per configured task key; 0 = null. uint32 is expected; any integer dtype
  whose values fit in [0, 2**63) is accepted. Floats, strings and negative ids are rejected.
- One dataset per enabled metadata component, named by its ``SOURCE``: (N, W) or (N,) numbers. With an optional
  ``column_names`` attribute, ``COLUMNS`` selects columns by name (in config order). ``DIM`` must equal the
  selected column count. When the source dataset is absent, ``raw_lat``/``raw_lon`` (spatial),
  ``raw_date_observed`` (temporal) or ``raw_elevation`` (elevation_*) are encoded on the fly with
  :mod:`linnaeus.data.encoders`.
- ``in_region`` (N,) 0/1, needed only by ``DATA.IN_REGION_ONLY`` and ``OOR_MASK``.
- ``observation_ids`` (N,) integers or strings, optional: rows with one id are photos of one observation (one
  organism); the split keeps them together and multi-view training reads them as one sample.
- Group ``metadata`` attribute ``config_json``: kept verbatim as provenance.

Missing metadata: a component row that is all zeros or has any NaN/inf is *missing*: its slice is zeroed and its
validity flag is False. Elevation at sea level encodes to sin 0 / cos 1, which is not all zeros, so it stays valid.
``OOR_MASK`` additionally masks (zeroes, flags invalid) a component where ``in_region == 0``; that masking is not
"missing" and never drops a row.

Fingerprint: sha256 of the file's bytes. It is independent of the configuration (the same file always has the
same fingerprint, whichever ranks a run uses) and changes whenever any label, identifier or metadata value does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from linnaeus.data.encoders import encode_from_raw, encoded_bound
from linnaeus.data.observations import observation_codes
from linnaeus.data.rules import raise_first
from linnaeus.errors import DataError, clip
from linnaeus.specs.data import ComponentSpec  # re-exported: the labels' view of a metadata component

IDENTIFIERS = "img_identifiers"
IN_REGION = "in_region"
OBSERVATION_IDS = "observation_ids"
RAW_LAT, RAW_LON, RAW_DATE, RAW_ELEVATION = "raw_lat", "raw_lon", "raw_date_observed", "raw_elevation"


def file_fingerprint(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 hex digest of the file's bytes (streamed; see the module docstring for why bytes, not contents)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class DuplicateReport:
    count: int = 0  # rows whose identifier also appears on an earlier row
    examples: list[tuple[str, list[int]]] = field(default_factory=list)  # (identifier, rows), first few

    def line(self, path: Path) -> str:
        ex = "; ".join(f"'{clip(i)}' on rows {r}" for i, r in self.examples[:3])
        return f"{path}: {self.count} rows repeat an earlier img_identifiers entry (e.g. {ex})"


@dataclass
class LabelStore:
    """Everything a run needs from one labels.h5, in memory. Rows are positions in the file."""

    path: Path
    identifiers: np.ndarray  # (N,) object array of str
    taxa: dict[str, np.ndarray]  # task key -> (N,) int64 taxon ids, 0 = null
    components: list[ComponentSpec]  # IDX order
    meta: np.ndarray  # (N, D) float32, zero where a component is missing or OOR-masked
    meta_valid: np.ndarray  # (N, C) bool, per component, after OOR masking
    meta_missing: np.ndarray  # (N, C) bool, the source row was all zeros or non-finite (before OOR masking)
    in_region: np.ndarray | None  # (N,) uint8 or None when the dataset is absent
    config_json: str | None
    fingerprint: str
    duplicates: DuplicateReport
    meta_origin: dict[str, str]  # component -> "h5" or "raw" (encoded from raw_* fields)
    observation_ids: np.ndarray | None = None  # (N,) int64 or object str; None when the dataset is absent

    @property
    def n_rows(self) -> int:
        return len(self.identifiers)

    @property
    def meta_dims(self) -> list[int]:
        return [c.dim for c in self.components]

    @cached_property
    def observation_codes(self) -> np.ndarray | None:
        """(N,) int64 dense observation codes (order of first appearance), or None without ``observation_ids``."""
        return None if self.observation_ids is None else observation_codes(self.observation_ids)

    def meta_slices(self) -> dict[str, slice]:
        """Column range of each component in the packed metadata vector."""
        out, start = {}, 0
        for c in self.components:
            out[c.name] = slice(start, start + c.dim)
            start += c.dim
        return out

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        path: str | Path,
        task_keys: list[str],
        components: list[ComponentSpec] | None = None,
        *,
        need_in_region: str | None = None,
    ) -> LabelStore:
        """Read and validate; raise DataError with the first schema problem (and how many more there are).

        ``need_in_region`` names the config key that requires the ``in_region`` dataset (None: optional).
        """
        store, problems = inspect_labels(path, task_keys, list(components or []), need_in_region)
        raise_first(problems)
        assert store is not None
        return store

    # ------------------------------------------------------------------------------------------- statistics
    def statistics(self, rows: np.ndarray | None = None) -> dict[str, Any]:
        """Counts over ``rows`` (default: all): nulls per rank, metadata coverage per component."""
        rows = np.arange(self.n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        n = len(rows)
        out: dict[str, Any] = {"rows": n, "nulls": {}, "distinct_taxa": {}, "metadata": {}}
        for key, ids in self.taxa.items():
            sel = ids[rows]
            out["nulls"][key] = int((sel == 0).sum())
            out["distinct_taxa"][key] = len(np.unique(sel[sel != 0]))
        oor = self.in_region[rows] == 0 if self.in_region is not None else np.zeros(n, bool)
        for j, c in enumerate(self.components):
            valid = int(self.meta_valid[rows, j].sum())
            out["metadata"][c.name] = {
                "source": c.source,
                "origin": self.meta_origin.get(c.name, "h5"),
                "dim": c.dim,
                "idx": c.idx,
                "valid": valid,
                "missing": int(self.meta_missing[rows, j].sum()),
                "oor_masked": int((oor & ~self.meta_missing[rows, j]).sum()) if c.oor_mask else 0,
                "coverage": round(valid / n, 6) if n else 0.0,
            }
        out["rows_all_ranks_null"] = int(np.all([self.taxa[k][rows] == 0 for k in self.taxa], axis=0).sum()) if n else 0
        return out


def inspect_labels(
    path: str | Path, task_keys: list[str], components: list[ComponentSpec], need_in_region: str | None = None
) -> tuple[LabelStore | None, list[str]]:
    """Like :meth:`LabelStore.load` but returns every schema problem (one line each) instead of raising."""
    problems: list[str] = []
    store = _read(Path(path), list(task_keys), list(components), need_in_region, problems)
    return (None if problems else store), problems


# ------------------------------------------------------------------------------------------------ internals
def _open_error(path: Path) -> str | None:
    if not path.exists():
        return f"labels file {path} does not exist"
    if path.is_dir():
        return f"labels file {path} is a directory, expected an HDF5 file"
    if not h5py.is_hdf5(str(path)):
        return f"labels file {path} is not an HDF5 file (expected labels.h5 written with h5py/HDF5)"
    return None


def _read(
    path: Path, task_keys: list[str], components: list[ComponentSpec], need_in_region: str | None, problems: list[str]
) -> LabelStore | None:
    err = _open_error(path)
    if err:
        problems.append(err)
        return None
    try:
        with h5py.File(path, "r") as f:
            raw = _read_all(f, path, task_keys, components, need_in_region, problems)
    except OSError as exc:  # a damaged file that still has an HDF5 signature
        problems.append(f"labels file {path}: cannot be read as HDF5 ({exc})")
        return None
    if problems or raw is None:
        return None
    ids, taxa, comp_arrays, in_region, config_json, origin, obs_ids = raw
    meta, valid, missing = _pack_meta(components, comp_arrays, in_region, len(ids))
    return LabelStore(
        path=path,
        identifiers=ids,
        taxa=taxa,
        components=components,
        meta=meta,
        meta_valid=valid,
        meta_missing=missing,
        in_region=in_region,
        config_json=config_json,
        fingerprint=file_fingerprint(path),
        duplicates=find_duplicates(ids),
        meta_origin=origin,
        observation_ids=obs_ids,
    )


def _dataset(f: h5py.File, name: str) -> h5py.Dataset | None:
    obj = f.get(name)
    return obj if isinstance(obj, h5py.Dataset) else None


def _read_all(
    f: h5py.File,
    path: Path,
    task_keys: list[str],
    components: list[ComponentSpec],
    need_in_region: str | None,
    problems: list[str],
) -> tuple | None:
    n: int | None = None
    ids = None
    ds = _dataset(f, IDENTIFIERS)
    if ds is None:
        problems.append(f"{path}: dataset '{IDENTIFIERS}' is missing (expected (N,) strings: image file names)")
    elif ds.ndim != 1:
        problems.append(f"{path}: dataset '{IDENTIFIERS}' has shape {ds.shape}, expected (N,)")
    elif h5py.check_string_dtype(ds.dtype) is None:
        problems.append(f"{path}: dataset '{IDENTIFIERS}' has dtype {ds.dtype}, expected variable-length strings")
    else:
        try:
            ids = ds.asstr()[()].astype(object)
        except UnicodeDecodeError as exc:
            problems.append(f"{path}: dataset '{IDENTIFIERS}' holds bytes that are not UTF-8 ({exc.reason})")
            return None
        n = len(ids)
        if n == 0:
            problems.append(f"{path}: dataset '{IDENTIFIERS}' has 0 rows; a labels file needs at least one image")
            return None
        empty = np.flatnonzero(ids == "")
        if len(empty):
            problems.append(f"{path}: '{IDENTIFIERS}' row {int(empty[0])} is an empty string ({len(empty)} rows empty)")

    def length_ok(name: str, length: int) -> bool:
        if n is not None and length != n:
            problems.append(f"{path}: dataset '{name}' has {length} rows but '{IDENTIFIERS}' has {n}")
            return False
        return True

    taxa: dict[str, np.ndarray] = {}
    for key in task_keys:
        arr = _read_taxa(f, path, key, problems)
        if arr is not None and length_ok(key, len(arr)):
            taxa[key] = arr

    in_region = None
    ds = _dataset(f, IN_REGION)
    if ds is not None:
        if ds.dtype.kind not in "biu" or ds.ndim != 1:
            problems.append(
                f"{path}: dataset '{IN_REGION}' has dtype {ds.dtype} shape {ds.shape}, expected (N,) uint8 0/1"
            )
        elif length_ok(IN_REGION, ds.shape[0]):
            in_region = (ds[()] != 0).astype(np.uint8)
    elif need_in_region:
        problems.append(f"{need_in_region} needs dataset '{IN_REGION}' (N,) uint8, which {path} does not have")

    obs_ids = _read_observation_ids(f, path, problems)
    if obs_ids is not None and not length_ok(OBSERVATION_IDS, len(obs_ids)):
        obs_ids = None

    comp_arrays: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for spec in components:
        arr, how = _read_component(f, path, spec, problems)
        if arr is not None and length_ok(spec.source, arr.shape[0]):
            comp_arrays[spec.name] = arr
            origin[spec.name] = how

    config_json = None
    group = f.get("metadata")
    if isinstance(group, h5py.Group) and "config_json" in group.attrs:
        value = group.attrs["config_json"]
        config_json = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    if ids is None or problems:
        return None
    return ids, taxa, comp_arrays, in_region, config_json, origin, obs_ids


def _read_observation_ids(f: h5py.File, path: Path, problems: list[str]) -> np.ndarray | None:
    """The optional ``observation_ids``: (N,) integers (int64) or strings (object array); None when absent."""
    if OBSERVATION_IDS not in f:
        return None
    ds = _dataset(f, OBSERVATION_IDS)
    expected = "expected (N,) integers or strings, one observation id per row"
    if ds is None or ds.ndim != 1:
        shape = "a group" if ds is None else f"shape {ds.shape}"
        problems.append(f"{path}: '{OBSERVATION_IDS}' is {shape}, {expected}")
        return None
    if h5py.check_string_dtype(ds.dtype) is not None:
        try:
            values = ds.asstr()[()].astype(object)
        except UnicodeDecodeError as exc:
            problems.append(f"{path}: dataset '{OBSERVATION_IDS}' holds bytes that are not UTF-8 ({exc.reason})")
            return None
        empty = np.flatnonzero(values == "")
        if len(empty):
            problems.append(
                f"{path}: '{OBSERVATION_IDS}' row {int(empty[0])} is an empty string ({len(empty)} rows empty); {expected}"
            )
            return None
        return values
    if ds.dtype.kind not in "iu":
        problems.append(f"{path}: dataset '{OBSERVATION_IDS}' has dtype {ds.dtype}, {expected}")
        return None
    arr = ds[()]
    if ds.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.size and arr.max() >= 2**63:
        row = int(np.argmax(arr))
        problems.append(f"{path}: '{OBSERVATION_IDS}' row {row} holds {int(arr[row])}, which does not fit int64")
        return None
    return arr.astype(np.int64)


def _read_taxa(f: h5py.File, path: Path, key: str, problems: list[str]) -> np.ndarray | None:
    ds = _dataset(f, key)
    if ds is None and key in f:
        problems.append(f"{path}: '{key}' is an HDF5 group, expected a dataset of shape (N,) with integer taxon ids")
        return None
    if ds is None:
        present = sorted(k for k in f.keys() if k.startswith("taxa_L"))
        problems.append(
            f"{path}: dataset '{key}' (listed in DATA.TASK_KEYS_H5) is missing; taxa datasets present: {present}"
        )
        return None
    if ds.ndim != 1:
        problems.append(f"{path}: dataset '{key}' has shape {ds.shape}, expected (N,)")
        return None
    kind = ds.dtype.kind
    if kind not in "iu":
        problems.append(f"{path}: dataset '{key}' has dtype {ds.dtype}, expected integer taxon ids (uint32; 0 = null)")
        return None
    arr = ds[()]
    if kind == "i" and arr.size and arr.min() < 0:
        row = int(np.flatnonzero(arr < 0)[0])
        problems.append(f"{path}: dataset '{key}' row {row} has taxon id {int(arr[row])}, expected ids >= 0 (0 = null)")
        return None
    if kind == "u" and arr.dtype.itemsize == 8 and arr.size and arr.max() >= 2**63:
        row = int(np.argmax(arr))
        problems.append(f"{path}: dataset '{key}' row {row} has taxon id {int(arr[row])}, which does not fit int64")
        return None
    return arr.astype(np.int64)


def _column_names(ds: h5py.Dataset) -> list[str] | None:
    if "column_names" not in ds.attrs:
        return None
    names = np.atleast_1d(ds.attrs["column_names"])
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _read_component(
    f: h5py.File, path: Path, spec: ComponentSpec, problems: list[str]
) -> tuple[np.ndarray | None, str]:
    ds = _dataset(f, spec.source)
    if ds is None:
        return _encode_raw(f, path, spec, problems), "raw"
    where = f"{spec.key}.SOURCE '{spec.source}' ({path})"
    if ds.dtype.kind not in "fiub" or ds.ndim not in (1, 2):
        problems.append(f"{where}: dataset has dtype {ds.dtype} shape {ds.shape}, expected (N, {spec.dim}) numbers")
        return None, "h5"
    width = 1 if ds.ndim == 1 else ds.shape[1]
    cols = list(range(width))
    if spec.columns:
        names = _column_names(ds)
        if names is None:
            problems.append(
                f"{where}: {spec.key}.COLUMNS {list(spec.columns)} needs a 'column_names' attribute on the dataset,"
                f" which it does not have; set {spec.key}.COLUMNS: [] to take the dataset's {width} columns as they are"
            )
            return None, "h5"
        unknown = [c for c in spec.columns if c not in names]
        if unknown:
            problems.append(f"{where}: {spec.key}.COLUMNS {unknown} not in the dataset's column_names {names}")
            return None, "h5"
        cols = [names.index(c) for c in spec.columns]  # config order, not file order
    if len(cols) != spec.dim:
        what = f"COLUMNS select {len(cols)}" if spec.columns else f"the dataset has {width} columns"
        problems.append(
            f"{spec.key}.DIM is {spec.dim} but {what} (dataset '{spec.source}' in {path}, shape {ds.shape})"
        )
        return None, "h5"
    arr = ds[()].astype(np.float32, copy=False)
    arr = arr.reshape(-1, 1) if arr.ndim == 1 else arr
    if cols != list(range(width)):
        arr = arr[:, cols]
    out_of_range = _out_of_range(path, spec, arr)
    if out_of_range:
        problems.append(out_of_range)
        return None, "h5"
    return np.ascontiguousarray(arr, dtype=np.float32), "h5"


def _out_of_range(path: Path, spec: ComponentSpec, arr: np.ndarray) -> str | None:
    """A finite value beyond what the component's encoder can produce (one such row turns every weight NaN).

    Rows with NaN/inf are missing, not out of range; sources without a known encoder are not bounded here.
    """
    bound = encoded_bound(spec.source)
    if bound is None or not arr.size:
        return None
    with np.errstate(invalid="ignore"):
        bad = np.isfinite(arr).all(axis=1) & (np.abs(arr) > bound * (1 + 1e-3)).any(axis=1)
    if not bad.any():
        return None
    row = int(np.flatnonzero(bad)[0])
    value = float(arr[row, int(np.argmax(np.abs(arr[row])))])
    return (
        f"{path}: dataset '{spec.source}' row {row} holds {value:g}, outside [-{bound:g}, {bound:g}], the range of"
        f" its encoding ({int(bad.sum())} rows like this; {spec.key}); fix the file, or write NaN to mark a row missing"
    )


def _encode_raw(f: h5py.File, path: Path, spec: ComponentSpec, problems: list[str]) -> np.ndarray | None:
    """Encode a component from the raw_* companions when its derived dataset is absent (same encoders as the
    demo generator and inference use). A raw value that is absent encodes to an all-zero row, i.e. missing."""
    kind = "elevation" if spec.source.startswith("elevation") else spec.source
    needs = {"spatial": [RAW_LAT, RAW_LON], "temporal": [RAW_DATE], "elevation": [RAW_ELEVATION]}.get(kind)
    present = sorted(k for k, v in f.items() if isinstance(v, h5py.Dataset))
    if needs is None or any(_dataset(f, n) is None for n in needs):
        hint = f", nor are the raw fields {needs} to encode it from" if needs else ""
        problems.append(
            f"{spec.key}.SOURCE: dataset '{spec.source}' is not in {path}{hint} (datasets present: {present})"
        )
        return None
    raw: dict[str, Any] = {}
    for name in needs:
        ds = _dataset(f, name)
        raw[name] = ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) else ds[()]
    try:
        arr = np.asarray(encode_from_raw(spec.source, raw, list(spec.columns) or None), np.float32)
    except DataError as exc:
        problems.append(f"{spec.key}: cannot encode '{spec.source}' from {needs} in {path}: {exc}")
        return None
    if arr.ndim != 2 or arr.shape[1] != spec.dim:
        problems.append(
            f"{spec.key}.DIM is {spec.dim} but encoding '{spec.source}' from {needs} gives {arr.shape[-1]} columns ({path})"
        )
        return None
    return arr


def _pack_meta(
    components: list[ComponentSpec], arrays: dict[str, np.ndarray], in_region: np.ndarray | None, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dims = [c.dim for c in components]
    meta = np.zeros((n, sum(dims)), np.float32)
    valid = np.zeros((n, len(components)), bool)
    missing = np.zeros((n, len(components)), bool)
    start = 0
    for j, spec in enumerate(components):
        arr = arrays[spec.name]
        miss = ~np.isfinite(arr).all(axis=1) | (arr == 0).all(axis=1)
        ok = ~miss
        if spec.oor_mask and in_region is not None:
            ok &= in_region != 0
        block = meta[:, start : start + spec.dim]
        block[ok] = arr[ok]
        valid[:, j] = ok
        missing[:, j] = miss
        start += spec.dim
    return meta, valid, missing


def find_duplicates(ids: np.ndarray, examples: int = 5) -> DuplicateReport:
    """Rows whose identifier repeats an earlier row's.

    Strings are first reduced to 64-bit hashes (memory: 8 bytes a row instead of a fixed-width copy of every
    string), and only rows whose hash repeats are compared as strings, so hash collisions are never reported.
    """
    n = len(ids)
    if n < 2:
        return DuplicateReport()
    hashes = np.fromiter((hash(s) for s in ids), dtype=np.int64, count=n)
    order = np.argsort(hashes, kind="stable")
    sorted_h = hashes[order]
    repeat = np.flatnonzero(sorted_h[1:] == sorted_h[:-1])
    if not len(repeat):
        return DuplicateReport()
    candidates = np.unique(np.concatenate([order[repeat], order[repeat + 1]]))
    groups: dict[str, list[int]] = {}
    for row in candidates.tolist():
        groups.setdefault(ids[row], []).append(row)
    dups = [(ident, rows) for ident, rows in groups.items() if len(rows) > 1]
    dups.sort(key=lambda d: d[1][0])
    count = sum(len(rows) - 1 for _, rows in dups)
    return DuplicateReport(count=count, examples=[(str(i), r[:5]) for i, r in dups[:examples]])


# ------------------------------------------------------------------------------------------------- filters
@dataclass
class FilterStep:
    name: str
    key: str  # the config key that asked for it
    dropped: int


@dataclass
class FilterReport:
    """Rows removed by each explicit filter, in the order applied (each count excludes earlier drops)."""

    path: str
    rows_total: int
    rows_kept: int
    steps: list[FilterStep] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows_total": self.rows_total,
            "rows_kept": self.rows_kept,
            "filters": [{"name": s.name, "key": s.key, "dropped": s.dropped} for s in self.steps],
        }


def apply_filters(
    store: LabelStore, *, in_region_only: bool = False, require_all_ranks: bool = False
) -> tuple[np.ndarray, FilterReport]:
    """Rows (int64, ascending) that survive the configured filters, with a count per filter.

    Order: in-region only, all ranks labelled, then each component with ALLOW_MISSING False (IDX order).
    """
    keep = np.ones(store.n_rows, bool)
    steps: list[FilterStep] = []

    def step(name: str, key: str, mask: np.ndarray) -> None:
        before = int(keep.sum())
        keep[:] &= mask
        steps.append(FilterStep(name, key, before - int(keep.sum())))

    if in_region_only:
        if store.in_region is None:  # load() already refuses this when the config asks for it
            raise DataError(f"DATA.IN_REGION_ONLY needs dataset '{IN_REGION}', which {store.path} does not have")
        step("in_region_only", "DATA.IN_REGION_ONLY", store.in_region != 0)
    if require_all_ranks:
        step("require_all_ranks", "DATA.REQUIRE_ALL_RANKS", np.all([v != 0 for v in store.taxa.values()], axis=0))
    for j, spec in enumerate(store.components):
        if not spec.allow_missing:
            step(f"missing_{spec.name.lower()}", f"{spec.key}.ALLOW_MISSING", ~store.meta_missing[:, j])
    rows = np.flatnonzero(keep).astype(np.int64)
    return rows, FilterReport(str(store.path), store.n_rows, len(rows), steps)
