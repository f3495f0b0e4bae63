"""``linnaeus predict --observations obs.jsonl``: one line per observation, one answer per observation.

Reading (:func:`read_observations`) and predicting (:func:`predict_observations`). A multi-view model (trained
with ``DATA.OBSERVATIONS``) pools its views' features before its heads (``MODEL.VIEW_POOLING``); an image model
is run on every photo and the observation's answer is the mean of the photos' log-probabilities, renormalised
(aggregated after the heads). Each result says which in ``input_context.aggregation``.

Each line is a JSON object: ``id`` (string or integer), ``images`` (a non-empty list of image paths; relative paths
are read from the file's folder) and optionally ``metadata`` (``lat``, ``lon``, ``date``, ``elevation``: the
observation's, shared by its photos). Anything else on a line is refused with one line naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from linnaeus.errors import ConfigError, DataError

FIELDS = ("id", "images", "metadata")
META_FIELDS = ("lat", "lon", "date", "elevation")


@dataclass(frozen=True)
class ObservationInput:
    id: str
    images: tuple[Path, ...]
    metadata: dict[str, Any] | None


def read_observations(path: str | Path) -> list[ObservationInput]:
    """Every observation of ``path`` (see the module docstring); the first problem raises one ``DataError`` line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--observations {path}: no such file (expected JSON lines: id, images, metadata)")
    out: list[ObservationInput] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not JSON ({err.msg}); expected one object per line") from None
        obs = _observation(record, where, path.parent)
        if obs.id in seen:
            raise DataError(f"{where}: id {obs.id!r} was already used on line {seen[obs.id]}; ids name one observation")
        seen[obs.id] = number
        out.append(obs)
    if not out:
        raise DataError(f"--observations {path}: holds no observations")
    return out


def _observation(record: Any, where: str, base: Path) -> ObservationInput:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with id, images and optional metadata")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; expected {list(FIELDS)}")
    ident = record.get("id")
    if not isinstance(ident, (str, int)) or isinstance(ident, bool) or ident == "":
        raise DataError(f"{where}: 'id' must be a non-empty string or an integer, got {ident!r}")
    images = record.get("images")
    if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
        raise DataError(f"{where}: 'images' must be a non-empty list of image paths, got {images!r}")
    paths = tuple(p if p.is_absolute() else base / p for p in map(Path, images))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{where}: image {missing[0]} does not exist ({len(missing)} of {len(paths)} missing)")
    meta = record.get("metadata")
    if meta is not None:
        if not isinstance(meta, dict):
            raise DataError(f"{where}: 'metadata' must be an object with {list(META_FIELDS)}, got {meta!r}")
        bad = sorted(set(meta) - set(META_FIELDS))
        if bad:
            raise DataError(f"{where}: unknown metadata field(s) {bad}; expected {list(META_FIELDS)}")
        meta = {k: v for k, v in meta.items() if v is not None} or None
    return ObservationInput(str(ident), paths, meta)


# ------------------------------------------------------------------------------------------------- predicting
def views_combined(predictor: Any) -> tuple[bool, str, float | None]:
    """How the predictor's model combines an observation's photos: (pooled before the heads, pooling mode, its
    temperature); an image model: (False, "mean", None), the mean of the photos' log-probabilities."""
    pooling = getattr(predictor.model, "pooling", None)
    return (False, "mean", None) if pooling is None else (True, pooling.mode, pooling.temperature)


def mean_of_log_probs(per_photo: dict[str, torch.Tensor], owner: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """An image model's answer for ``n`` observations: per key, the mean of its photos' log-probabilities
    (``owner``: each photo's observation index), renormalised. Averaging commutes with temperature scaling up to a
    per-row constant, so calibrating the photos' answers before or after gives the same result."""
    counts = torch.bincount(owner, minlength=n)
    out = {}
    for key, lp in per_photo.items():
        total = torch.zeros(n, lp.shape[1], dtype=lp.dtype).index_add_(0, owner, lp)
        out[key] = torch.log_softmax(total / counts[:, None].clamp_min(1).to(lp.dtype), dim=1)
    return out


@torch.inference_mode()
def observation_log_probs(predictor: Any, views: Sequence[Sequence[Path]], meta: torch.Tensor | None) -> dict:
    """Per task key, (N, K) calibrated log-probabilities of N observations (see the module docstring)."""
    from linnaeus.inference.calibration import scale_all
    from linnaeus.models.view_pooling import pack_views

    counts = torch.tensor([len(v) for v in views])
    flat = predictor.load_images([image for v in views for image in v])
    per_photo_meta = None if meta is None else meta.repeat_interleave(counts, dim=0)
    if not views_combined(predictor)[0]:
        owner = torch.repeat_interleave(torch.arange(len(views)), counts)
        return mean_of_log_probs(predictor.log_probs(flat, per_photo_meta), owner, len(views))
    bags, mask = pack_views(predictor.features(flat, per_photo_meta), counts)
    return scale_all(predictor.raw_log_probs_of_features(bags, mask), predictor.temperatures)


def predict_observations(
    predictor: Any,
    observations: Sequence[ObservationInput],
    top_k: int = 5,
    consistent: bool = True,
    *,
    batch_size: int = 32,
    policy: Any = None,
) -> list[Any]:
    """One typus ``ClassificationResult`` per observation (``batch_size`` observations at a time), with
    ``evidence_shape`` multi_view_observation and ``aggregation`` filled."""
    from linnaeus.inference.decoding import decode
    from linnaeus.inference.typus_output import observation_context

    if top_k < 1 or batch_size < 1:
        raise ConfigError(f"top_k and batch_size: expected >= 1, got {top_k} and {batch_size}")
    policy = policy if policy is not None else predictor.default_policy
    pooled, mode, temperature = views_combined(predictor)
    out: list[Any] = []
    for start in range(0, len(observations), batch_size):
        chunk = observations[start : start + batch_size]
        names = [o.id for o in chunk]
        meta, _ = predictor.encode_metadata([o.metadata for o in chunk], len(chunk), names)
        lp = observation_log_probs(predictor, [o.images for o in chunk], meta)
        if not consistent or policy.kind == "repair":
            decoded = decode(lp, predictor.hierarchy, top_k, consistent)
            results = [predictor.results.build(d, names[i], top_k) for i, d in enumerate(decoded)]
        else:
            results = predictor.results_with_policy(lp, policy, names, top_k)
        for obs, result in zip(chunk, results, strict=True):
            context = observation_context([str(p) for p in obs.images], pooled, mode, temperature)
            out.append(result.model_copy(update={"input_context": context}))
    return out


def result_line(observation_id: str, result: Any) -> str:
    """One JSON line: the typus result with the observation's id first (``observationId``, beside the schema's
    fields; typus ignores it when it reads the line back)."""
    body = json.loads(result.to_json())
    return json.dumps({"observationId": observation_id, **body})
