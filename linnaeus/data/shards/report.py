"""``shard_report(cfg)``: the shard folder's state for ``linnaeus check`` (never raises for bad shards).

It lists the manifest, whether its labels fingerprint (and, given a ``PreparedData``, the split) matches the
current labels, sample/shard/skip counts per split, and shard files that are missing or have the wrong size
(optionally the wrong sha256). Problems go to ``errors``/``warnings`` as one line each, like the check report.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from linnaeus.data.shards import manifest as mf
from linnaeus.errors import LinnaeusError

if TYPE_CHECKING:
    from linnaeus.config import Config
    from linnaeus.data.prepare import PreparedData


def _labels_now(cfg: Config) -> dict[str, tuple[str, str]]:
    """split -> (labels path, sha256) without reading labels.h5 (fingerprint = sha256 of the file's bytes)."""
    from linnaeus.data.labels import file_fingerprint
    from linnaeus.data.prepare import label_paths

    train, val = label_paths(cfg)
    fp_train = file_fingerprint(train)
    fp_val = file_fingerprint(val) if val else fp_train
    return {"train": (str(train), fp_train), "val": (str(val or train), fp_val)}


def shard_report(
    cfg: Config, prepared: PreparedData | None = None, *, verify_checksums: bool = False
) -> dict[str, Any]:
    """State of ``DATA.SHARDS.DIR`` against the labels (and the split, when ``prepared`` is given)."""
    r: dict[str, Any] = {
        "enabled": bool(cfg.DATA.SHARDS.ENABLED),
        "dir": None,
        "manifest": None,
        "format_version": None,
        "tool_version": None,
        "created": None,
        "fingerprint_match": None,
        "split_match": None,
        "splits": {},
        "errors": [],
        "warnings": [],
        "ok": True,
    }
    if not cfg.DATA.SHARDS.DIR:
        if cfg.DATA.SHARDS.ENABLED:
            r["errors"].append("DATA.SHARDS.DIR: not set; expected the folder written by `linnaeus shard`")
        r["ok"] = not r["errors"]
        return r
    from linnaeus.data.prepare import resolve_path

    shard_dir = resolve_path(cfg.DATA.SHARDS.DIR)
    r["dir"] = str(shard_dir)
    try:
        manifest = mf.read_manifest(shard_dir)
    except LinnaeusError as err:
        (r["errors"] if cfg.DATA.SHARDS.ENABLED else r["warnings"]).append(str(err))
        r["ok"] = not r["errors"]
        return r
    r["manifest"] = str(shard_dir / mf.MANIFEST_NAME)
    r["format_version"] = manifest.get("format_version")
    r["tool_version"] = manifest.get("tool", {}).get("version")
    r["created"] = manifest.get("created")
    hint = f"rerun `linnaeus shard --cfg {manifest.get('config') or 'EXP.yaml'} --out {shard_dir}`"
    _check_identity(cfg, prepared, manifest, shard_dir, hint, r)
    for split, entry in manifest["splits"].items():
        r["splits"][split] = _check_files(shard_dir, split, entry, verify_checksums, hint, r)
    train = r["splits"].get("train")
    if train is None:
        r["errors" if cfg.DATA.SHARDS.ENABLED else "warnings"].append(
            f"{r['manifest']}: no train shards; {hint} --splits train"
        )
    elif train["shards"] < max(1, cfg.DATA.NUM_WORKERS):
        r["warnings"].append(
            f"{shard_dir}: {train['shards']} train shards for DATA.NUM_WORKERS {cfg.DATA.NUM_WORKERS} workers per "
            "process; readers will resample shards (smaller --samples-per-shard mixes better)"
        )
    r["ok"] = not r["errors"]
    return r


def _check_identity(
    cfg: Config, prepared: PreparedData | None, manifest: dict, shard_dir: Path, hint: str, r: dict[str, Any]
) -> None:
    source = manifest.get("source", {})
    splits = [s for s in mf.SPLITS if s in manifest["splits"]]
    if prepared is not None:
        problems = [p for s in splits if (p := mf.identity_problem(manifest, prepared, s, shard_dir))]
        fp_ok = all(
            source.get("labels", {}).get(s, {}).get("fingerprint") == prepared.view(s).store.fingerprint for s in splits
        )
        r["fingerprint_match"] = fp_ok
        r["split_match"] = not problems if fp_ok else None
        r["errors"] += [f"{p}; {hint}" for p in problems]
        return
    try:
        now = _labels_now(cfg)
    except (LinnaeusError, OSError) as err:
        r["warnings"].append(f"labels fingerprint not checked: {err}")
        return
    r["fingerprint_match"] = True
    for s in splits:
        path, fp = now[s]
        old = str(source.get("labels", {}).get(s, {}).get("fingerprint") or "none")
        if old != fp:
            r["fingerprint_match"] = False
            r["errors"].append(
                f"{path} changed since the {s} shards in {shard_dir} were written (labels fingerprint {old[:12]}… in "
                f"{mf.MANIFEST_NAME}, {fp[:12]}… now); {hint}"
            )


def _check_files(
    shard_dir: Path, split: str, entry: dict, verify: bool, hint: str, r: dict[str, Any]
) -> dict[str, Any]:
    missing, wrong = [], []
    for shard in entry.get("shards", []):
        path = shard_dir / shard["name"]
        if not path.is_file():
            missing.append(shard["name"])
        elif path.stat().st_size != shard["bytes"] or (verify and mf.file_sha256(path) != shard["sha256"]):
            wrong.append(shard["name"])
    if missing:
        r["errors"].append(f"shard {shard_dir / missing[0]}: missing (+{len(missing) - 1} more {split} shards); {hint}")
    if wrong:
        what = "size or sha256" if verify else "size"
        r["errors"].append(
            f"shard {shard_dir / wrong[0]}: {what} differs from {mf.MANIFEST_NAME} (+{len(wrong) - 1} more); {hint}"
        )
    return {
        "samples": int(entry.get("num_samples", 0)),
        "shards": int(entry.get("num_shards", 0)),
        "skipped": int(entry.get("num_skipped", 0)),
        "missing_files": missing,
        "bad_files": wrong,
    }
