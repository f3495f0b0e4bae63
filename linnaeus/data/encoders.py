"""Metadata encoders: raw latitude/longitude, observation date and elevation → the float features in labels.h5.

One module for every caller: the demo generator writes labels.h5 with it, on-the-fly encoding from the ``raw_*``
datasets uses it, and inference encodes ``--lat/--lon/--date/--elevation`` with it, so training and serving can
never disagree about an encoding. The formulas follow polli-typus (``typus.models.geo``) and the published
labels.h5 schema; these are vectorised NumPy versions of them.

Missing input (None, NaN, empty string) becomes an all-zero row, which is how labels.h5 marks a missing
component. Every valid encoding has a non-zero row by construction (each sin/cos pair has norm 1), so
"all zeros" is unambiguous: sea level (0 m) encodes with cos terms equal to 1 and is never mistaken for
missing, and neither is lat/lon (0, 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any

import numpy as np

from linnaeus.errors import DataError

# Elevation scales in metres for the default set "elevation_broadrange_2" (10 columns): the finest resolves
# local relief (100 m); the coarsest (20 km) has a half period longer than the whole terrestrial range
# (about -430 m to 8,849 m), so the pair (sin, cos) at that scale alone identifies any elevation uniquely.
ELEVATION_SCALES: tuple[float, ...] = (100.0, 500.0, 1000.0, 5000.0, 20000.0)
ELEVATION_SETS: dict[str, tuple[float, ...]] = {"elevation_broadrange_2": ELEVATION_SCALES}

SPATIAL_COLUMNS: tuple[str, ...] = ("spatial_x", "spatial_y", "spatial_z")
TEMPORAL_COLUMNS: tuple[str, ...] = ("month_sin", "month_cos")
TEMPORAL_HOUR_COLUMNS: tuple[str, ...] = ("month_sin", "month_cos", "hour_sin", "hour_cos")


def elevation_column_names(scales: Sequence[float] = ELEVATION_SCALES) -> tuple[str, ...]:
    """``elev_<scale>_sin``, ``elev_<scale>_cos`` per scale, in encoding order (the published naming)."""
    return tuple(f"elev_{s:g}_{fn}" for s in scales for fn in ("sin", "cos"))


# Column names by labels.h5 dataset name (the temporal set with hours is written under the same name "temporal").
COLUMN_NAMES: dict[str, tuple[str, ...]] = {
    "spatial": SPATIAL_COLUMNS,
    "temporal": TEMPORAL_COLUMNS,
    "temporal_hour": TEMPORAL_HOUR_COLUMNS,
    **{name: elevation_column_names(scales) for name, scales in ELEVATION_SETS.items()},
}


def encoded_bound(source: str) -> float | None:
    """Largest absolute value the encoding of a labels.h5 dataset can hold (every column is a sin, a cos or a unit
    vector component), or None for a source no encoder here produces."""
    return 1.0 if source in COLUMN_NAMES or source.startswith("elevation") else None


def _as_float(values: Any, name: str) -> np.ndarray:
    """1-D float64 array; None → NaN so that missing values flow through as NaN."""
    if isinstance(values, (list, tuple)) or (isinstance(values, np.ndarray) and values.dtype == object):
        values = [np.nan if v is None else v for v in np.asarray(values, dtype=object).reshape(-1)]
    try:
        return np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise DataError(f"{name}: expected numbers (None/NaN for missing), got {err}") from None


def _sin_cos(turns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    angle = 2.0 * np.pi * turns
    return np.sin(angle), np.cos(angle)


def valid_mask(encoded: np.ndarray) -> np.ndarray:
    """Per row: True when the encoding is present (finite and not all zeros). Shape (N,) for (N, D) input."""
    x = np.asarray(encoded)
    if x.ndim == 1:
        x = x[:, None]
    return np.isfinite(x).all(axis=1) & (x != 0).any(axis=1)


# ------------------------------------------------------------------------------------------------------ spatial
def encode_spatial(lat_deg: Any, lon_deg: Any, *, name: str = "lat/lon") -> np.ndarray:
    """Latitude/longitude in degrees → unit-sphere (x, y, z) = (cosφcosλ, cosφsinλ, sinφ), float32 (N, 3).

    A row with NaN/None in either coordinate is missing (all zeros). Latitudes outside [-90, 90] or
    longitudes outside [-180, 360] are data errors, named by ``name`` and index.
    """
    lat = _as_float(lat_deg, f"{name} latitude")
    lon = _as_float(lon_deg, f"{name} longitude")
    if lat.shape != lon.shape:
        raise DataError(f"{name}: {lat.size} latitudes but {lon.size} longitudes; expected one of each per row")
    ok = np.isfinite(lat) & np.isfinite(lon)
    bad = np.flatnonzero(ok & ((np.abs(lat) > 90.0) | (lon < -180.0) | (lon > 360.0)))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{name}[{i}]: lat={lat[i]:g}, lon={lon[i]:g} is out of range; expected lat in [-90, 90], lon in [-180, 360]"
        )
    phi = np.radians(np.where(ok, lat, 0.0))
    lam = np.radians(np.where(ok, lon, 0.0))
    out = np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], axis=1)
    out[~ok] = 0.0
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------------- temporal
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def parse_datetime(value: Any, *, name: str = "date") -> tuple[float, float]:
    """One raw date → (month 1..12, hour 0..24 or NaN when the value carries no time of day).

    Accepts ``date``/``datetime`` objects, ISO 8601 strings (``2024-06-01``, ``2024-06-01T14:30:00Z``,
    ``2024-06-01 14:30``, with or without offset) and bytes. None, NaN, "" and "nan"/"none"/"null" are
    missing and give (NaN, NaN). The hour is local clock time as written; offsets are not converted,
    because what matters ecologically is the observer's local time.
    """
    if value is None:
        return math.nan, math.nan
    if isinstance(value, float) and math.isnan(value):
        return math.nan, math.nan
    if isinstance(value, datetime):
        return float(value.month), value.hour + value.minute / 60.0
    if isinstance(value, date):
        return float(value.month), math.nan
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", errors="replace")
    text = str(value).strip()
    if text.lower() in ("", "nan", "none", "null", "nat"):
        return math.nan, math.nan
    if not _ISO_DATE.match(text):
        raise DataError(f"{name}: cannot parse {text!r}; expected an ISO 8601 date such as 2024-06-01")
    has_time = len(text) > 10 and text[10] in "T "
    iso = text[:-1] + "+00:00" if text.endswith("Z") else text  # Python 3.10 fromisoformat rejects "Z"
    try:
        dt = datetime.fromisoformat(iso) if has_time else datetime.fromisoformat(text[:10])
    except ValueError:
        raise DataError(f"{name}: cannot parse {text!r}; expected an ISO 8601 date such as 2024-06-01") from None
    return float(dt.month), (dt.hour + dt.minute / 60.0) if has_time else math.nan


def _parse_many(dates: Sequence[Any] | np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse each distinct value once: real files repeat a few thousand dates over millions of rows."""
    cache: dict[Any, tuple[float, float]] = {}
    m = np.empty(len(dates), dtype=np.float64)
    h = np.empty(len(dates), dtype=np.float64)
    for i, v in enumerate(dates):
        try:
            got = cache.get(v)
        except TypeError:  # unhashable; parse directly
            got = None
        if got is None:
            got = parse_datetime(v, name=f"{name}[{i}]")
            if isinstance(v, (str, bytes)):
                cache[v] = got
        m[i], h[i] = got
    return m, h


def encode_temporal(
    dates: Sequence[Any] | np.ndarray | None = None,
    *,
    months: Any = None,
    hours: Any = None,
    with_hour: bool = False,
    name: str = "date",
) -> np.ndarray:
    """Cyclic month (and optionally hour of day) → float32 (N, 2) or (N, 4).

    Month-based, as polli-typus and the published files: columns ``month_sin, month_cos`` are
    sin/cos(2π·month/12) with month 1..12 (December wraps to the same point as "month 0"). With
    ``with_hour`` two more columns ``hour_sin, hour_cos`` = sin/cos(2π·hour/24).

    Give either ``dates`` (strings/date/datetime/None, see ``parse_datetime``) or ``months`` (1..12, NaN for
    missing) plus optional ``hours`` (0..24, NaN for unknown). A missing date zeroes the whole row; a known
    date without a time of day zeroes only the hour columns.
    """
    if (dates is None) == (months is None):
        raise ValueError("encode_temporal: pass exactly one of dates= or months=")
    if dates is not None:
        m, h = _parse_many(dates, name)
    else:
        m = _as_float(months, f"{name} months")
        h = np.full_like(m, np.nan) if hours is None else _as_float(hours, f"{name} hours")
        if h.shape != m.shape:
            raise DataError(f"{name}: {m.size} months but {h.size} hours; expected one of each per row")
    ok_m = np.isfinite(m)
    bad = np.flatnonzero(ok_m & ((m < 1) | (m > 12)))
    if bad.size:
        raise DataError(f"{name}[{int(bad[0])}]: month {m[bad[0]]:g} out of range; expected 1..12")
    ms, mc = _sin_cos(np.where(ok_m, m, 0.0) / 12.0)
    cols = [np.where(ok_m, ms, 0.0), np.where(ok_m, mc, 0.0)]
    if with_hour:
        ok_h = ok_m & np.isfinite(h)
        hs, hc = _sin_cos(np.where(ok_h, h, 0.0) / 24.0)
        cols += [np.where(ok_h, hs, 0.0), np.where(ok_h, hc, 0.0)]
    return np.stack(cols, axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- elevation
def encode_elevation(elev_m: Any, scales: Sequence[float] = ELEVATION_SCALES, *, name: str = "elevation") -> np.ndarray:
    """Elevation in metres → float32 (N, 2·len(scales)): [sin(2π·e/s), cos(2π·e/s)] per scale s, in order.

    NaN/None is missing (all zeros). 0 m is a real value: its cos columns are 1.
    """
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"encode_elevation: scales must be positive, got {list(scales)}")
    e = _as_float(elev_m, name)
    ok = np.isfinite(e)
    cols = []
    for s in scales:
        sn, cs = _sin_cos(np.where(ok, e, 0.0) / float(s))
        cols += [np.where(ok, sn, 0.0), np.where(ok, cs, 0.0)]
    return np.stack(cols, axis=1).astype(np.float32) if cols else np.zeros((e.size, 0), np.float32)


def scales_from_column_names(column_names: Sequence[str]) -> tuple[float, ...]:
    """Recover elevation scales from ``elev_<s>_sin``/``elev_<s>_cos`` names (order kept, duplicates merged)."""
    scales: list[float] = []
    for col in column_names:
        m = re.fullmatch(r"elev_([0-9.eE+-]+)_(sin|cos)", col)
        if not m:
            raise DataError(f"elevation column {col!r}: expected a name like elev_100_sin or elev_100_cos")
        s = float(m.group(1))
        if s not in scales:
            scales.append(s)
    return tuple(scales)


# ------------------------------------------------------------------------------------------- raw → component
def encode_from_raw(source: str, raw: Mapping[str, Any], column_names: Sequence[str] | None = None) -> np.ndarray:
    """Encode one metadata component from raw fields, e.g. for inference or labels.h5 files without features.

    ``source`` is the labels.h5 dataset name (``spatial``, ``temporal``, ``elevation_<set>``); ``raw`` holds
    ``raw_lat``/``raw_lon``, ``raw_date_observed`` or ``raw_elevation`` (1-D sequences). ``column_names``
    (from the file's attribute or the config's COLUMNS) chooses hour columns and elevation scales and the
    output column order; without it the defaults of this module apply.
    """
    if source == "spatial":
        enc, names = encode_spatial(raw["raw_lat"], raw["raw_lon"]), SPATIAL_COLUMNS
    elif source == "temporal":
        with_hour = column_names is not None and any(c.startswith("hour_") for c in column_names)
        enc = encode_temporal(raw["raw_date_observed"], with_hour=with_hour, name="raw_date_observed")
        names = TEMPORAL_HOUR_COLUMNS if with_hour else TEMPORAL_COLUMNS
    elif source.startswith("elevation"):
        if column_names:
            scales = scales_from_column_names(column_names)
        elif source in ELEVATION_SETS:
            scales = ELEVATION_SETS[source]
        else:
            raise DataError(
                f"{source}: unknown elevation set; give column_names like elev_100_sin to define its scales"
            )
        enc, names = (
            encode_elevation(raw["raw_elevation"], scales, name="raw_elevation"),
            elevation_column_names(scales),
        )
    else:
        raise DataError(f"{source}: no raw encoder; expected spatial, temporal or elevation_<set>")
    if column_names is None:
        return enc
    index = {n: i for i, n in enumerate(names)}
    missing = [c for c in column_names if c not in index]
    if missing:
        raise DataError(f"{source}: cannot encode column(s) {missing} from raw fields; known columns: {list(names)}")
    return np.ascontiguousarray(enc[:, [index[c] for c in column_names]])
