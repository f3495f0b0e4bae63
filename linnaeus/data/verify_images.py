"""Image verification: does every image exist (and decode), within the limits the configuration allows?

Missing/corrupt images (in ``linnaeus check`` and ``DATA.HYBRID.VERIFY_IMAGES``): without
``DATA.HYBRID.ALLOW_MISSING_IMAGES`` any unreadable image is an error naming the file and its labels.h5 row, unless
it is within the limit ``max(MAX_MISSING_COUNT, floor(MAX_MISSING_RATIO × images checked))``: then its row is left
out of training (the prior system's behaviour). With ``ALLOW_MISSING_IMAGES`` unreadable images up to that limit are
kept, replaced and counted. A limit of 0 means none (it never means "unlimited").
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from linnaeus.errors import DataError, clip
from linnaeus.specs.data import VerifyImagesSpec
from linnaeus.utils.io import atomic_write_json


def _probe(path: str, decode: bool) -> str | None:
    """None when the image is fine, else a short description of the problem."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if size == 0:
        return "is empty (0 bytes)"
    if not decode:
        return None
    import warnings

    from PIL import Image

    from linnaeus.data.images import MAX_PIXELS, too_large

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, as training does
            with Image.open(path) as im:
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    return too_large(im.size)
                im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale; still reads every entropy-coded block
                im.load()
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        return f"cannot be decoded ({type(exc).__name__}: {exc})"
    return None


def scan_images(paths: Sequence[str], *, decode: bool = False, workers: int = 8) -> list[tuple[int, str]]:
    """(index, problem) for every unreadable path, in index order. Threads: stat/open/decode release the GIL."""
    n = len(paths)
    if not n:
        return []
    chunk = max(1, min(2048, math.ceil(n / (workers * 8))))

    def work(start: int) -> list[tuple[int, str]]:
        out = []
        for i in range(start, min(n, start + chunk)):
            problem = _probe(paths[i], decode)
            if problem:
                out.append((i, problem))
        return out

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(work, range(0, n, chunk))
        return [item for part in results for item in part]


def verify_images(
    paths: Sequence[str],
    rows: np.ndarray,
    identifiers: Sequence[str],
    limits: VerifyImagesSpec,
    report_path: Path | None,
    *,
    allow_missing: bool = False,
    decode: bool | None = None,
    raise_on_error: bool = True,
) -> dict[str, Any]:
    """Check that every image exists (and decodes, with DECODE); write a JSON report; enforce the limits.

    Returns the report dict (``ok``, ``error``, counts, ``items`` = every problem with row/identifier/path).
    With ``raise_on_error`` a failed check raises DataError with the report's one-line ``error``.
    """
    decode = limits.decode if decode is None else decode
    n = len(paths)
    found = scan_images(paths, decode=decode, workers=limits.num_workers)
    items = [
        {"row": int(rows[i]), "identifier": str(identifiers[i]), "path": str(paths[i]), "problem": p} for i, p in found
    ]
    missing = sum(1 for _, p in found if p == "does not exist")
    bad = len(found)
    limit = max(limits.max_missing_count, math.floor(limits.max_missing_ratio * n + 1e-9))
    error = None
    excluded: list[dict[str, Any]] = []
    if bad and not allow_missing and bad <= limit:
        excluded = items  # within VERIFY_IMAGES' limits: these rows are left out of training (as Polli Linnaeus did)
    elif bad and not allow_missing:
        first = items[0]
        error = (
            f"image {clip(first['path'])} (labels.h5 row {first['row']}) {clip(first['problem'])}; {bad} of {n} images are"
            " missing or unreadable; fix them, or set DATA.HYBRID.ALLOW_MISSING_IMAGES True and"
            " DATA.HYBRID.VERIFY_IMAGES.MAX_MISSING_COUNT/MAX_MISSING_RATIO to replace and count them (or set only"
            " the limits to leave those rows out)"
        )
    elif bad > limit:
        first = items[0]
        error = (
            f"{bad} of {n} images are missing or unreadable (first: {clip(first['path'])}, labels.h5 row {first['row']},"
            f" {clip(first['problem'])}), more than DATA.HYBRID.VERIFY_IMAGES allows: max(MAX_MISSING_COUNT"
            f" {limits.max_missing_count}, MAX_MISSING_RATIO {limits.max_missing_ratio} x {n}) = {limit}"
        )
    report = {
        "ok": error is None,
        "error": error,
        "checked": n,
        "decoded": bool(decode),
        "missing": missing,
        "corrupt": bad - missing,
        "unreadable_ratio": round(bad / n, 6) if n else 0.0,
        "allow_missing": bool(allow_missing),
        "limit": limit,
        "excluded_rows": len(excluded),
        "report_path": str(report_path) if report_path else None,
        "items": items,
    }
    if report_path is not None:
        atomic_write_json(Path(report_path), report)
    if error and report_path is not None:
        report["error"] = error = f"{error} (full list: {report_path})"
    if error and raise_on_error:
        raise DataError(error)
    return report


__all__ = ["scan_images", "verify_images"]
