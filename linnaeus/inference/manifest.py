"""``linnaeus predict --manifest FILE``: one image per row with its own metadata, read as a stream.

CSV (with a header row) or JSON lines (``.jsonl``/``.ndjson``). Per row: the image path (column ``image`` or
``path``; relative paths are relative to the manifest's folder) and optionally ``latitude``/``lat``,
``longitude``/``lon``, ``date`` (ISO 8601) and ``elevation`` (metres). An empty cell or null is missing metadata.
Rows are read lazily, so a manifest of millions of images starts predicting at once and holds one batch in memory.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from linnaeus.errors import DataError

IMAGE_COLUMNS = ("image", "path")
NUMBER_COLUMNS = {"latitude": "lat", "lat": "lat", "longitude": "lon", "lon": "lon", "elevation": "elevation"}
TEXT_COLUMNS = {"date": "date"}
EXPECTED = "image (or path), and optionally latitude/lat, longitude/lon, date, elevation"


@dataclass(frozen=True)
class ManifestRow:
    image: Path
    metadata: dict[str, Any] | None
    where: str  # "FILE:LINE", for error lines


def _row(raw: dict[str, Any], base: Path, where: str) -> ManifestRow:
    keys = {str(k).strip().lower(): v for k, v in raw.items()}
    unknown = [k for k in keys if k not in (*IMAGE_COLUMNS, *NUMBER_COLUMNS, *TEXT_COLUMNS)]
    if unknown:
        raise DataError(f"{where}: unknown column(s) {', '.join(unknown)}; expected {EXPECTED}")
    image = next((keys[c] for c in IMAGE_COLUMNS if keys.get(c) not in (None, "")), None)
    if image is None:
        raise DataError(f"{where}: no image path (column image or path)")
    path = Path(str(image)).expanduser()
    path = path if path.is_absolute() else Path(os.path.normpath(base / path))  # no '..' in the result ids
    meta: dict[str, Any] = {}
    for column, field in NUMBER_COLUMNS.items():
        value = keys.get(column)
        if value is None or value == "":
            continue
        try:
            meta[field] = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: {column} {value!r} is not a number") from None
    if keys.get("date") not in (None, ""):
        meta["date"] = str(keys["date"])
    if ("lat" in meta) != ("lon" in meta):
        raise DataError(f"{where}: latitude and longitude go together (give both or neither)")
    return ManifestRow(path, meta or None, where)


def read_manifest(path: str | Path) -> Iterator[ManifestRow]:
    """The manifest's rows, one at a time; a bad row is a DataError naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--manifest {p}: no such file")
    base = p.resolve().parent
    with p.open(newline="", encoding="utf-8") as fh:
        if p.suffix.lower() in (".jsonl", ".ndjson"):
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{p}:{n}: not a JSON object ({err.msg})") from None
                if not isinstance(raw, dict):
                    raise DataError(f"{p}:{n}: expected a JSON object with {EXPECTED}")
                yield _row(raw, base, f"{p}:{n}")
        elif p.suffix.lower() == ".csv":
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not any(f.strip().lower() in IMAGE_COLUMNS for f in reader.fieldnames):
                raise DataError(f"{p}:1: the header row needs an image (or path) column; expected {EXPECTED}")
            for raw in reader:
                if None in raw:  # more cells than header columns
                    raise DataError(f"{p}:{reader.line_num}: more cells than header columns")
                yield _row(raw, base, f"{p}:{reader.line_num}")
        else:
            raise DataError(f"--manifest {p}: expected a .csv or .jsonl file")
