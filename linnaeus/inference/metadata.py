"""Raw observation metadata (latitude, longitude, date, elevation) → the packed vector the model was trained on.

A bundle records, per enabled component in IDX order, which labels.h5 dataset it came from and the exact column
names, so serving encodes with :func:`linnaeus.data.encoders.encode_from_raw` (the function labels.h5 features
and on-the-fly training encodings come from) with the same columns in the same order. A missing field gives that
component an all-zero slice and a False validity flag, which is how labels.h5 marks a missing component and
therefore what the model saw for missing metadata in training and validation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from linnaeus.data import encoders
from linnaeus.errors import DataError

if TYPE_CHECKING:
    from linnaeus.config import Config

log = logging.getLogger("linnaeus")

# Accepted metadata keys → canonical field. The raw_* spellings are labels.h5's, so rows can be fed back as-is.
FIELD_ALIASES: dict[str, str] = {
    "lat": "lat",
    "latitude": "lat",
    "raw_lat": "lat",
    "lon": "lon",
    "lng": "lon",
    "longitude": "lon",
    "raw_lon": "lon",
    "date": "date",
    "datetime": "date",
    "datetime_utc": "date",
    "observed_on": "date",
    "date_observed": "date",
    "raw_date_observed": "date",
    "elevation": "elevation",
    "elevation_m": "elevation",
    "raw_elevation": "elevation",
}
# encoder kind → (canonical fields it needs, the raw_* names encode_from_raw reads them under)
_RAW_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "spatial": (("lat", "raw_lat"), ("lon", "raw_lon")),
    "temporal": (("date", "raw_date_observed"),),
    "elevation": (("elevation", "raw_elevation"),),
}


@dataclass(frozen=True)
class MetaComponent:
    """One enabled component as serving needs it. ``encoder`` None: not encodable from raw fields (always masked)."""

    name: str
    idx: int
    source: str
    dim: int
    columns: tuple[str, ...]
    encoder: str | None  # "spatial" | "temporal" | "elevation" | None
    fields: tuple[str, ...]  # canonical raw fields it is computed from
    note: str = ""
    columns_from: str = ""  # COLUMNS_FROM_CONFIG | COLUMNS_FROM_LABELS | COLUMNS_ASSUMED ("" in older bundles)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["columns"] = list(self.columns)
        d["fields"] = list(self.fields)
        if self.encoder == "elevation":
            d["scales"] = list(encoders.scales_from_column_names(self.columns))
        if self.encoder == "temporal":
            d["with_hour"] = any(c.startswith("hour_") for c in self.columns)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> MetaComponent:
        try:
            return cls(
                name=str(d["name"]),
                idx=int(d["idx"]),
                source=str(d["source"]),
                dim=int(d["dim"]),
                columns=tuple(str(c) for c in d["columns"]),
                encoder=None if d.get("encoder") is None else str(d["encoder"]),
                fields=tuple(str(f) for f in d.get("fields", [])),
                note=str(d.get("note", "")),
                columns_from=str(d.get("columns_from", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{where}: metadata component {dict(d)!r} is malformed ({err!r})") from None


COLUMNS_FROM_CONFIG = "config COLUMNS"
COLUMNS_FROM_LABELS = "labels.h5 column_names"
COLUMNS_ASSUMED = "built-in default (assumed, not read)"


def encoder_kind(source: str) -> str | None:
    if source in ("spatial", "temporal"):
        return source
    if source.startswith("elevation"):
        return "elevation"
    return None


def _labels_column_names(cfg: Config, source: str) -> list[str] | None:
    """The ``column_names`` attribute of the training labels.h5 dataset, when that file is still reachable."""
    from linnaeus.config.resolve_data import labels_spec
    from linnaeus.data.paths import label_paths
    from linnaeus.errors import ConfigError

    try:
        paths = [p for p in label_paths(labels_spec(cfg)) if p is not None]
    except ConfigError:  # no labels path configured: nothing to read, the defaults decide
        return None
    import h5py

    for path in paths:
        if not Path(path).is_file():
            continue
        try:
            with h5py.File(path, "r") as f:
                ds = f.get(source)
                if isinstance(ds, h5py.Dataset) and "column_names" in ds.attrs:
                    names = np.atleast_1d(ds.attrs["column_names"])
                    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
        except OSError:
            continue
    return None


def _default_columns(source: str, dim: int) -> tuple[str, ...] | None:
    if source == "temporal":
        return (
            encoders.TEMPORAL_HOUR_COLUMNS if dim == len(encoders.TEMPORAL_HOUR_COLUMNS) else encoders.TEMPORAL_COLUMNS
        )
    return encoders.COLUMN_NAMES.get(source)


def resolve_components(cfg: Config) -> list[MetaComponent]:
    """Enabled components in IDX order with their columns fixed: the config's COLUMNS, else the labels file's
    ``column_names`` (when readable), else the encoders' defaults for that source (recorded as assumed in
    ``columns_from``: ``linnaeus export`` refuses those unless told to assume). Components whose columns the
    raw encoders cannot produce are kept (the model has slots for them) but marked not encodable."""
    from linnaeus.config.resolve_data import meta_spec

    out = []
    for spec in meta_spec(cfg).components:
        kind = encoder_kind(spec.source)
        columns, columns_from = tuple(spec.columns), COLUMNS_FROM_CONFIG
        if not columns:
            columns, columns_from = tuple(_labels_column_names(cfg, spec.source) or ()), COLUMNS_FROM_LABELS
        if not columns:
            columns, columns_from = _default_columns(spec.source, spec.dim) or (), COLUMNS_ASSUMED
        note = ""
        if kind is None or not columns:
            kind, note = None, f"no raw encoder for labels.h5 dataset '{spec.source}'"
        else:
            try:
                probe = encoders.encode_from_raw(spec.source, _empty_raw(kind), list(columns))
                if probe.shape[1] != spec.dim:
                    kind, note = None, f"raw encoding gives {probe.shape[1]} columns, DIM is {spec.dim}"
            except DataError as err:
                kind, note = None, str(err)
        if kind is None:
            log.warning(
                "%s: cannot be encoded from raw metadata (%s); predictions will always treat it as missing",
                spec.key,
                note,
            )
        fields = tuple(f for f, _ in _RAW_FIELDS[kind]) if kind else ()
        out.append(
            MetaComponent(spec.name, spec.idx, spec.source, spec.dim, tuple(columns), kind, fields, note, columns_from)
        )
    return out


def _empty_raw(kind: str, n: int = 1) -> dict[str, Any]:
    return {raw: [None] * n for _, raw in _RAW_FIELDS[kind]}


def canonical_record(record: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """A user's metadata dict with keys mapped to lat/lon/date/elevation; unknown keys are an error, None/NaN/"" is
    missing."""
    if record is None:
        return {}
    if not isinstance(record, Mapping):
        raise DataError(
            f"{where}: metadata must be a dict like {{'lat': 45.2, 'lon': -122.7}}, got {type(record).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in record.items():
        field = FIELD_ALIASES.get(str(key).lower())
        if field is None:
            raise DataError(f"{where}: unknown metadata key '{key}'; expected lat, lon, date (ISO 8601), elevation (m)")
        out[field] = value
    return out


def encode_records(
    components: Sequence[MetaComponent], records: Sequence[Mapping[str, Any] | None], names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(meta float32 (N, ΣDIM), meta_valid bool (N, C)) for N records, packed in IDX order.

    Each record is encoded on its own so an out-of-range value is reported with its image's name.
    """
    n = len(records)
    dims = [c.dim for c in components]
    meta = np.zeros((n, sum(dims)), np.float32)
    valid = np.zeros((n, len(components)), bool)
    canon = [canonical_record(r, names[i]) for i, r in enumerate(records)]
    start = 0
    for j, comp in enumerate(components):
        if comp.encoder is not None:
            for i, rec in enumerate(canon):
                raw = {raw_name: [rec.get(field)] for field, raw_name in _RAW_FIELDS[comp.encoder]}
                try:
                    row = encoders.encode_from_raw(comp.source, raw, list(comp.columns))[0]
                except DataError as err:
                    raise DataError(f"{names[i]}: metadata {comp.name}: {err}") from None
                # Same rule as labels.h5 packing: non-finite or all-zero = missing → zero slice, flag False.
                if np.isfinite(row).all() and (row != 0).any():
                    meta[i, start : start + comp.dim] = row
                    valid[i, j] = True
        start += comp.dim
    return meta, valid
