"""``linnaeus predict`` and ``linnaeus export`` (arguments are declared in ``linnaeus.cli``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from linnaeus.data.prepare import IMAGE_SUFFIXES
from linnaeus.errors import ConfigError, DataError


def collect_images(args: Iterable[str]) -> list[Path]:
    """Files as given; folders searched recursively for image files (sorted, so output order is reproducible)."""
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
        else:
            raise DataError(f"{p}: no such image file or folder")
    return out


def metadata_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    if (args.lat is None) != (args.lon is None):
        raise ConfigError("--lat/--lon: give both (a location needs both coordinates) or neither")
    record = {"lat": args.lat, "lon": args.lon, "date": args.date, "elevation": args.elevation}
    record = {k: v for k, v in record.items() if v is not None}
    return record or None


def predict_stream(
    predictor: Any,
    images: Sequence[Path],
    metadata: Mapping[str, Any] | None,
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
    """Predict ``images`` in batches, writing one JSON line (or a table block) per image as each batch finishes.

    An image that cannot be decoded gets one ``error:`` line on stderr (its path is appended to ``failed``) and the
    rest of its batch is still predicted. Returns the number of images predicted."""
    from tqdm.auto import tqdm

    from linnaeus.data.images import ImageDecodeError
    from linnaeus.inference.table import format_result

    def run(chunk: list[Path]) -> list[Any]:
        meta = None if metadata is None else [metadata] * len(chunk)
        return predictor.predict(
            chunk, meta, top_k, consistent, batch_size=batch_size, ids=[str(p) for p in chunk], policy=policy
        )

    done = 0
    with tqdm(
        total=len(images), desc="predict", unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True
    ) as bar:
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            try:
                results = run(chunk)
            except ImageDecodeError:
                # Rare: redo this batch one image at a time so only the unreadable ones are left out.
                results = []
                for image in chunk:
                    try:
                        results += run([image])
                    except ImageDecodeError as err:
                        bar.write(f"error: {err}", file=sys.stderr)
                        if failed is not None:
                            failed.append(str(image))
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
    observations = getattr(args, "observations", None)
    if observations and args.images:
        raise ConfigError("predict: give image files or --observations FILE, not both")
    if not observations and not args.images:
        raise ConfigError("predict: give image files or folders, or --observations FILE (JSON lines)")
    if observations:
        from linnaeus.inference.observations import read_observations

        if metadata_from_args(args) is not None:
            raise ConfigError("--lat/--lon/--date/--elevation: with --observations, each line carries its metadata")
        observed = read_observations(observations)  # every line checked before the model loads
    images = collect_images(args.images)
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
    failed: list[str] = []
    predict_stream(
        predictor,
        images,
        metadata,
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
        print(f"predict: {len(images)} images in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return 1 if failed else 0  # each unreadable image already has its error line


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
            f"export: calibrated on {doc['rows']} validation rows (T: {temps}); default policy {args.default_policy}",
            file=sys.stderr,
        )
    return 0
