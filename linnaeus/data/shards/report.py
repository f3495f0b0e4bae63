"""``shard_report(spec)``: the shard folder's state for ``linnaeus check`` (never raises for bad shards).

It lists the manifest, whether its labels fingerprint (and the split) matches the current data, sample/shard/skip
counts per split, shard files that are missing or have the wrong size (optionally the wrong sha256), and shards
whose source images changed since they were written (stale). Problems go to ``errors``/``warnings`` as one line
each, like the check report; the rules themselves live in ``manifest`` and ``writer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from linnaeus.data.shards import manifest as mf
from linnaeus.errors import LinnaeusError

if TYPE_CHECKING:
    from linnaeus.data.prepare import PreparedData
    from linnaeus.specs.data import DataSpec


def shard_report(
    spec: DataSpec, prepared: PreparedData | None = None, *, verify_checksums: bool = False
) -> dict[str, Any]:
    """State of ``DATA.SHARDS.DIR`` against the labels, the split and the source images (``prepared`` is built
    here when not given; if that fails only the labels fingerprint is compared)."""
    shards = spec.shards
    r: dict[str, Any] = {
        "enabled": bool(shards.enabled),
        "dir": None,
        "manifest": None,
        "format_version": None,
        "tool_version": None,
        "fingerprint_match": None,
        "split_match": None,
        "stale_shards": None,
        "splits": {},
        "errors": [],
        "warnings": [],
        "ok": True,
    }
    if not shards.dir:
        if shards.enabled:
            r["errors"].append("DATA.SHARDS.DIR: not set; expected the folder written by `linnaeus shard`")
        r["ok"] = not r["errors"]
        return r
    from linnaeus.data.paths import resolve_path

    shard_dir = resolve_path(shards.dir)
    r["dir"] = str(shard_dir)
    try:
        manifest = mf.read_manifest(shard_dir)
    except LinnaeusError as err:
        (r["errors"] if shards.enabled else r["warnings"]).append(str(err))
        r["ok"] = not r["errors"]
        return r
    r["manifest"] = str(shard_dir / mf.MANIFEST_NAME)
    r["format_version"] = manifest.get("format_version")
    r["tool_version"] = manifest.get("tool", {}).get("version")
    hint = f"rerun `{mf.reshard_command(manifest, shard_dir)}`"
    prepared = _check_identity(spec, prepared, manifest, shard_dir, hint, r)
    for split, entry in manifest["splits"].items():
        r["splits"][split] = _check_files(shard_dir, split, entry, verify_checksums, hint, r)
    if prepared is not None and r["split_match"]:
        _check_sources(spec, prepared, manifest, shard_dir, hint, r)
    train = r["splits"].get("train")
    if train is None:
        r["errors" if shards.enabled else "warnings"].append(f"{r['manifest']}: no train shards; {hint} --splits train")
    elif train["shards"] < max(1, spec.loader.num_workers):
        r["warnings"].append(
            f"{shard_dir}: {train['shards']} train shards for DATA.NUM_WORKERS {spec.loader.num_workers} workers per "
            "process; readers will resample shards (smaller --samples-per-shard mixes better)"
        )
    r["ok"] = not r["errors"]
    return r


def _check_identity(
    spec: DataSpec, prepared: PreparedData | None, manifest: dict, shard_dir: Path, hint: str, r: dict[str, Any]
) -> PreparedData | None:
    """Fills fingerprint_match/split_match; returns the PreparedData it compared against, if any."""
    splits = [s for s in mf.SPLITS if s in manifest["splits"]]
    if prepared is None:
        from linnaeus.data.prepare import prepare_data

        try:
            prepared = prepare_data(spec, check_images=False)
        except (LinnaeusError, OSError) as err:
            r["warnings"].append(f"split and source images not compared with the shards: {err}")
    try:
        now = mf.split_identity(prepared) if prepared is not None else mf.labels_identity(spec.labels)
    except (LinnaeusError, OSError) as err:
        r["warnings"].append(f"labels fingerprint not checked: {err}")
        return None
    labels_only = {"labels": now["labels"]}
    fp_problems = mf.identity_problems(manifest, labels_only, splits, shard_dir)
    r["fingerprint_match"] = not fp_problems
    problems = mf.identity_problems(manifest, now, splits, shard_dir) if prepared is not None else fp_problems
    if prepared is not None and not fp_problems:
        r["split_match"] = not problems
    r["errors"] += [f"{p}; {hint}" for p in problems]
    return prepared


def _check_files(
    shard_dir: Path, split: str, entry: dict, verify: bool, hint: str, r: dict[str, Any]
) -> dict[str, Any]:
    missing, damaged = mf.shard_file_problems(shard_dir, entry, checksums=verify)
    if missing:
        r["errors"].append(f"shard {shard_dir / missing[0]}: missing (+{len(missing) - 1} more {split} shards); {hint}")
    if damaged:
        what = "size or sha256" if verify else "size"
        r["errors"].append(
            f"shard {shard_dir / damaged[0]}: {what} differs from {mf.MANIFEST_NAME} (+{len(damaged) - 1} more); {hint}"
        )
    return {
        "samples": int(entry.get("num_samples", 0)),
        "shards": int(entry.get("num_shards", 0)),
        "skipped": int(entry.get("num_skipped", 0)),
        "missing_files": missing,
        "bad_files": damaged,
    }


def _check_sources(
    spec: DataSpec, prepared: PreparedData, manifest: dict, shard_dir: Path, hint: str, r: dict[str, Any]
) -> None:
    if not spec.images.images_dir:
        r["warnings"].append("source images not compared with the shards: DATA.HYBRID.IMAGES_DIR is not set")
        return
    from linnaeus.data.shards.writer import stale_shards

    stale = stale_shards(prepared, manifest, shard_dir)
    r["stale_shards"] = sum(len(v) for v in stale.values())
    for split, names in stale.items():
        if names:
            r["errors"].append(
                f"shard {shard_dir / names[0]}: its source images changed since it was written (+{len(names) - 1} "
                f"more stale {split} shards); {hint} to rewrite them"
            )
