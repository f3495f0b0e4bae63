"""``linnaeus predict`` and ``linnaeus export`` (arguments are declared in ``linnaeus.cli``)."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from linnaeus.data.prepare import IMAGE_SUFFIXES
from linnaeus.errors import ConfigError, DataError, clip


def collect_images(args: Iterable[str], missing: list[str] | None = None) -> list[Path]:
    """Files as given; folders searched recursively for image files (sorted, so output order is reproducible).
    A path that does not exist is appended to ``missing`` when given (it then costs only its own image), else
    refused."""
    out: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{p}: folder holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            out += found
        elif p.is_file():
            out.append(p)
        elif missing is not None:
            missing.append(str(p))
        else:
            raise DataError(f"{p}: no such image file or folder")
    return out


def metadata_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    if (args.lat is None) != (args.lon is None):
        raise ConfigError("--lat/--lon: give both (a location needs both coordinates) or neither")
    record = {"lat": args.lat, "lon": args.lon, "date": args.date, "elevation": args.elevation}
    record = {k: v for k, v in record.items() if v is not None}
    return record or None


def predict_items(
    predictor: Any,
    items: Iterable[tuple[Path, Mapping[str, Any] | None]],
    total: int | None,
    out: TextIO,
    *,
    top_k: int = 5,
    batch_size: int = 32,
    consistent: bool = True,
    progress: bool = True,
    fmt: str = "json",
    failed: list[str] | None = None,
    policy: Any = None,
) -> int:
    """Predict (image, its own metadata) pairs in batches, read lazily (one batch in memory), writing one JSON line
    (or a table block) per image as each batch finishes. An image that is missing or cannot be decoded gets one
    ``error:`` line on stderr (its path appended to ``failed``) and the rest of its batch is still predicted. Returns
    the number of images predicted."""
    from tqdm.auto import tqdm

    from linnaeus.data.images import ImageDecodeError
    from linnaeus.inference.table import format_result

    def run(chunk: list[tuple[Path, Mapping[str, Any] | None]]) -> list[Any]:
        paths = [p for p, _ in chunk]
        metas = [m for _, m in chunk]
        meta = None if all(m is None for m in metas) else metas
        return predictor.predict(
            paths, meta, top_k, consistent, batch_size=batch_size, ids=[str(p) for p in paths], policy=policy
        )

    def left_out(image: Path, err: BaseException | str, bar: Any) -> None:
        bar.write(f"error: {err}", file=sys.stderr)
        if failed is not None:
            failed.append(str(image))

    done = 0
    it = iter(items)
    with tqdm(
        total=total, desc="predict", unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True
    ) as bar:
        while chunk := list(itertools.islice(it, batch_size)):
            present = []
            for image, meta in chunk:
                if Path(image).is_file():
                    present.append((image, meta))
                else:
                    left_out(image, f"{image}: no such image file", bar)
            try:
                results = run(present) if present else []
            except ImageDecodeError:
                # Rare: redo this batch one image at a time so only the unreadable ones are left out.
                results = []
                for item in present:
                    try:
                        results += run([item])
                    except ImageDecodeError as err:
                        left_out(item[0], err, bar)
            for result in results:
                if fmt == "table":
                    bar.write(format_result(json.loads(result.to_json())) + "\n", file=out)
                else:
                    out.write(result.to_json() + "\n")
            out.flush()
            done += len(results)
            bar.update(len(chunk))
    return done


def run_predict(args: argparse.Namespace) -> int:
    from linnaeus.inference.predictor import Predictor

    if args.top_k < 1:
        raise ConfigError(f"--top-k: expected an integer >= 1, got {args.top_k}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    start = time.monotonic()
    manifest = getattr(args, "manifest", None)
    observations = getattr(args, "observations", None)
    sources = [
        name
        for name, given in (("images", args.images), ("--manifest", manifest), ("--observations", observations))
        if given
    ]
    if len(sources) > 1:
        raise ConfigError(
            f"predict: give one of image files, --manifest FILE or --observations FILE, not {' and '.join(sources)}"
        )
    if not sources:
        raise ConfigError("predict: give image files or folders, --manifest FILE or --observations FILE (JSON lines)")
    if (manifest or observations) and metadata_from_args(args) is not None:
        raise ConfigError(
            "--lat/--lon/--date/--elevation: with --manifest or --observations, each row carries its metadata"
        )
    if observations:
        from linnaeus.inference.observations import read_observations

        observed = read_observations(observations)  # every line checked before the model loads
    failed: list[str] = []
    images = collect_images(args.images, missing=failed) if args.images else []
    if args.images and not images and failed:  # nothing to predict: one line, as for any refused input
        raise DataError(
            f"{clip(failed[0])}: no such image file or folder"
            + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")
        )
    metadata = metadata_from_args(args)
    device = getattr(args, "device", None)
    # stdout holds only results: DeepSpeed prints while a run's checkpoint is consolidated, so loading talks to stderr.
    calibrate = not getattr(args, "no_calibration", False)
    with contextlib.redirect_stdout(sys.stderr):
        predictor = (
            Predictor.from_bundle(args.bundle, device, calibrate=calibrate)
            if args.bundle
            else Predictor.from_run(args.run, device=device, calibrate=calibrate)
        )
    policy = predictor.policy(getattr(args, "policy", None), getattr(args, "cost_profile", None))
    if metadata is not None:  # a bad --date or --lat fails here, once, rather than on the first batch
        predictor.encode_metadata([metadata], 1, ["--lat/--lon/--date/--elevation"])
    if observations:
        return _predict_observations(predictor, observed, policy, args, start)
    for path in failed:  # like an unreadable image: its own error line, the others are still predicted
        print(f"error: {clip(path)}: no such image file or folder", file=sys.stderr)
    if manifest:
        from linnaeus.inference.manifest import read_manifest

        items: Iterable[tuple[Path, Mapping[str, Any] | None]] = (
            (r.image, r.metadata) for r in read_manifest(manifest)
        )
        total = None
    else:
        items, total = ((image, metadata) for image in images), len(images)
    n = predict_items(
        predictor,
        items,
        total,
        sys.stdout,
        top_k=args.top_k,
        batch_size=args.batch_size,
        consistent=not args.raw,
        progress=sys.stderr.isatty(),  # a bar in a log file is only carriage returns
        fmt=getattr(args, "format", "json"),
        failed=failed,
        policy=policy,
    )
    if not sys.stderr.isatty():
        print(f"predict: {n + len(failed)} images in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return 1 if failed else 0  # each missing or unreadable image already has its error line


def _predict_observations(predictor: Any, observed: list, policy: Any, args: argparse.Namespace, start: float) -> int:
    """One JSON line (or table block) per observation of ``--observations``."""
    from linnaeus.inference.observations import predict_observations, result_line
    from linnaeus.inference.table import format_result

    for i in range(0, len(observed), args.batch_size):
        chunk = observed[i : i + args.batch_size]
        results = predict_observations(
            predictor, chunk, args.top_k, not args.raw, batch_size=args.batch_size, policy=policy
        )
        for obs, result in zip(chunk, results, strict=True):
            if getattr(args, "format", "json") == "table":
                print(f"observation {obs.id}\n" + format_result(json.loads(result.to_json())) + "\n")
            else:
                print(result_line(obs.id, result))
        sys.stdout.flush()
    if not sys.stderr.isatty():
        print(f"predict: {len(observed)} observations in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from linnaeus.inference.bundle import INFO, export_bundle

    path = export_bundle(args.run, args.out, args.which, assume_encodings=args.assume_encodings)
    info = json.loads((path / INFO).read_text())
    print(f"export: {info['which']} weights (step {info['step']}) of {args.run} -> {path}", file=sys.stderr)
    if getattr(args, "calibrate", False):
        from linnaeus.commands.evaluate import calibrate_bundle
        from linnaeus.inference.bundle import Bundle
        from linnaeus.inference.eval_data import from_split

        bundle = Bundle.load(path)
        doc = calibrate_bundle(
            bundle,
            from_split(bundle, "val"),
            target_accuracy=args.target_accuracy,
            default_policy=args.default_policy,
        )
        temps = ", ".join(f"{k} {t:.3f}" for k, t in doc["temperature_by_rank"].items())
        print(
            f"export: calibrated on {doc['rows']} validation {doc['unit']}s (T: {temps}); default policy "
            f"{args.default_policy}",
            file=sys.stderr,
        )
    return 0
