"""``linnaeus calibrate`` and ``linnaeus evaluate`` (arguments are declared in ``linnaeus.cli``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from linnaeus.errors import ConfigError


def _bundle(args: argparse.Namespace) -> Any:
    from linnaeus.inference.bundle import Bundle

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed may print while a checkpoint is consolidated
        if args.bundle:
            return Bundle.load(args.bundle)
        return Bundle.from_run(args.run, args.which)


def _evalset(args: argparse.Namespace, bundle: Any) -> Any:
    from linnaeus.inference import eval_data

    if args.labels or args.images:
        if not (args.labels and args.images):
            raise ConfigError("--labels/--images: give both (a labels file and its image folder)")
        if args.split:
            raise ConfigError("--split and --labels: choose one data source")
        return eval_data.from_labels(bundle, args.labels, args.images)
    return eval_data.from_split(bundle, args.split or "val")


def _check_common(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ConfigError(f"--workers: expected an integer >= 0, got {args.workers}")


def calibrate_bundle(
    bundle: Any,
    evalset: Any,
    *,
    target_accuracy: float = 0.95,
    default_policy: str = "repair",
    cost_profile: str | None = None,
    device: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit per-rank temperatures on ``evalset`` (its known rows), then the threshold and climb policies on the
    calibrated probabilities for ``target_accuracy``; store everything with the bundle's weights.

    A multi-view model answers observations (its views pooled before the heads), and pooled answers are sharper
    than one photo's: when the set has ``observation_ids`` it is calibrated on its answers per observation (those
    whose photos agree on their labels), and ``unit`` in the stored document says so."""
    import torch

    from linnaeus.inference import calibration, eval_data, eval_observations, policies
    from linnaeus.inference.observations import views_combined
    from linnaeus.inference.predictor import Predictor

    if not 0.0 < target_accuracy < 1.0:
        raise ConfigError(f"--target-accuracy: expected a number in (0, 1), got {target_accuracy}")
    if default_policy not in policies.POLICIES:
        raise ConfigError(f"--default-policy {default_policy!r}: expected one of {', '.join(policies.POLICIES)}")
    predictor = Predictor(bundle, device, calibrate=False)
    scoring = {"batch_size": batch_size, "workers": workers, "progress": progress, "desc": "calibrate"}
    observations = eval_observations.observations_of(evalset) if views_combined(predictor)[0] else None
    h = predictor.hierarchy
    if observations is None:
        unit, lp = "image", eval_data.score(predictor, evalset, **scoring)
        known = ~evalset.novel
        targets = {k: evalset.table.targets[k][known] for k in h.keys}
    else:
        unit, (_, lp) = "observation", eval_observations.score_observations(predictor, evalset, observations, **scoring)
        first = observations.first
        known = observations.agree & ~evalset.novel[first]
        targets = {k: evalset.table.targets[k][first][known] for k in h.keys}
    doc = calibration.fit({k: lp[k][known] for k in h.keys}, targets, evalset.set_id)
    doc["unit"] = unit
    cal_lps = [calibration.scale(torch.as_tensor(lp[k][known]), doc["temperature_by_rank"][k]) for k in h.keys]
    ys = [targets[k] for k in h.keys]
    doc["policies"] = {
        "threshold": policies.fit_threshold(cal_lps, ys, h, target_accuracy).to_json(),
        "climb": policies.fit_climb(cal_lps, ys, h, target_accuracy).to_json(),
    }
    doc["default_policy"] = default_policy
    if cost_profile:
        doc["cost_profile"] = cost_profile
    policies.check_policy(default_policy, doc["policies"], cost_profile)
    doc["rows"] = int(known.sum())
    bundle.set_calibration(doc)
    return doc


def calibrate_finished_run(run: Path) -> None:
    """``TRAIN.CALIBRATE``: when training ends, fit the best weights' temperatures and policies on the run's own
    validation split (``export/calibration.json``; a rerun of a finished run finds it and does nothing). A data
    problem (e.g. a rank with no labelled validation row) is one warning line saying how to calibrate later; the run
    itself has succeeded."""
    import logging

    from linnaeus.errors import LinnaeusError
    from linnaeus.inference import eval_data
    from linnaeus.inference.bundle import Bundle

    log = logging.getLogger("linnaeus")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            bundle = Bundle.from_run(run, "best")
        if bundle.calibration is not None:
            return
        doc = calibrate_bundle(bundle, eval_data.from_split(bundle, "val"))
    except LinnaeusError as err:
        log.warning("calibration after training left out (%s); `linnaeus calibrate --run %s` fits it later", err, run)
        return
    temps = ", ".join(f"{k} {r['temperature']:.2f}" for k, r in doc["per_rank"].items())
    log.info(
        "calibrated the best weights (step %s) on %d validation %ss: temperatures %s -> %s",
        bundle.info.get("step"),
        doc["rows"],
        doc["unit"],
        temps,
        run / "export" / "calibration.json",
    )


def run_calibrate(args: argparse.Namespace) -> int:
    _check_common(args)
    bundle = _bundle(args)
    evalset = _evalset(args, bundle)
    start = time.monotonic()
    doc = calibrate_bundle(
        bundle,
        evalset,
        target_accuracy=args.target_accuracy,
        default_policy=args.default_policy,
        cost_profile=args.cost_profile,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=sys.stderr.isatty(),
    )
    for key, r in doc["per_rank"].items():
        print(
            f"calibrate: {key} T={r['temperature']:.3f}  NLL {r['nll_before']:.4f} -> {r['nll_after']:.4f}  "
            f"ECE {r['ece_before']:.4f} -> {r['ece_after']:.4f}",
            file=sys.stderr,
        )
    for name, spec in doc["policies"].items():
        fit = spec["parameters"]["fit"]
        print(
            f"calibrate: {name} policy for accuracy {args.target_accuracy}: coverage {fit['coverage']:.3f}, "
            f"accuracy {fit['accuracy']:.3f} on {doc['rows']} {doc['unit']}s",
            file=sys.stderr,
        )
    where = bundle.path or Path(bundle.info["run"]) / "export"
    print(f"calibrate: {doc['rows']} {doc['unit']}s in {time.monotonic() - start:.1f} s -> {where}", file=sys.stderr)
    return 0


def decisions_from_results(results: list[Any], predictor: Any) -> Any:
    """A policy's typus outcomes back to array decisions (the ``cost`` policy runs on results only)."""
    from linnaeus.inference.policies import BELOW, COMMIT, Decisions

    h = predictor.hierarchy
    n, r_count = len(results), len(h.keys)
    chosen = np.full((n, r_count), -1, np.int64)
    reason = np.full((n, r_count), BELOW, np.int8)
    for i, res in enumerate(results):
        outs = {o.rank_level: o for o in res.outcomes or []}
        for r, key in enumerate(h.keys):
            o = outs.get(h.levels[r])
            if o is not None and o.decision == "commit" and o.resolved_to is not None:
                tid = getattr(o.resolved_to.match, "taxon_id", None)
                idx = predictor.bundle.class_maps[key].index(np.asarray([tid or 0], np.int64))[0]
                chosen[i, r] = idx
                reason[i, r] = COMMIT
    return Decisions(chosen, reason, np.zeros((n, r_count)))


def _results(predictor: Any, lp_raw: dict[str, np.ndarray], policy: Any, ids: list[str], top_k: int = 5) -> list:
    """typus results of already scored rows (calibrated here, as the Predictor would)."""
    import torch

    from linnaeus.inference.calibration import scale_all
    from linnaeus.inference.decoding import decode

    out = []
    for start in range(0, len(ids), 256):
        lp = scale_all({k: torch.as_tensor(v[start : start + 256]) for k, v in lp_raw.items()}, predictor.temperatures)
        names = ids[start : start + 256]
        if policy.kind == "repair":
            out += [
                predictor.results.build(d, names[i], top_k)
                for i, d in enumerate(decode(lp, predictor.hierarchy, top_k))
            ]
        else:
            out += predictor.results_with_policy(lp, policy, names, top_k)
    return out


def run_evaluate(args: argparse.Namespace) -> int:
    from linnaeus.inference import eval_data, eval_observations, evaluation
    from linnaeus.inference.predictor import Predictor

    _check_common(args)
    start = time.monotonic()
    bundle = _bundle(args)
    predictor = Predictor(bundle, args.device, calibrate=not args.no_calibration)
    policy = predictor.policy(args.policy, args.cost_profile)
    evalset = _evalset(args, bundle)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    modes = {"on": [False], "masked": [True], "both": [False, True]}[args.metadata]
    h = predictor.hierarchy
    names = {k: list(bundle.class_maps[k].names or [None] * len(bundle.class_maps[k])) for k in h.keys}
    ids = [str(p) for p in evalset.table.paths]
    observations = eval_observations.observations_of(evalset)
    metrics = _metrics_header(bundle, predictor, evalset, observations)
    curves: dict[str, Any] = {}
    counts = eval_data.train_counts(bundle)
    progress = sys.stderr.isatty()
    for masked in modes:
        mode = "masked" if masked else "on"
        lp, lp_obs = _score(predictor, evalset, observations, args, masked, progress)
        results = None
        save = args.save_predictions and out is not None and masked == modes[0]  # the first mode's predictions
        if policy.kind == "cost" or save:
            results = _results(predictor, lp, policy, ids)
        decisions = decisions_from_results(results, predictor) if policy.kind == "cost" else None
        figs = evaluation.figures(
            lp,
            evalset.table.targets,
            evalset.taxa,
            evalset.novel,
            h,
            names,
            predictor.temperatures,
            policy,
            counts,
            decisions,
        )
        metrics["metadata"][mode] = figs
        if lp_obs is not None:
            assert observations is not None
            figs["observations"], obs_results = _per_observation(
                predictor, policy, evalset, observations, lp_obs, names, counts, save
            )
            if obs_results is not None:
                _save_observation_predictions(
                    out / "predictions_observations.jsonl", predictor, evalset, observations, obs_results
                )
        curves[mode] = _risk_curves(lp, evalset, predictor)
        if save and results is not None:
            with open(out / "predictions.jsonl", "w") as fh:
                for r in results:
                    fh.write(r.to_json() + "\n")
    metrics["seconds"] = time.monotonic() - start
    _write_outputs(metrics, curves, out)
    return 0


def _score(
    predictor: Any, evalset: Any, observations: Any, args: argparse.Namespace, masked: bool, progress: bool
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """One metadata mode's uncalibrated log-probabilities: per image, and per observation when the set has them."""
    from linnaeus.inference import eval_data, eval_observations

    mode = "masked" if masked else "on"
    t0 = time.monotonic()
    scoring = {
        "batch_size": args.batch_size,
        "workers": args.workers,
        "masked": masked,
        "progress": progress,
        "desc": f"evaluate ({mode})",
    }
    if observations is None:
        lp, lp_obs = eval_data.score(predictor, evalset, **scoring), None
    else:
        lp, lp_obs = eval_observations.score_observations(predictor, evalset, observations, **scoring)
    if not progress:
        took = time.monotonic() - t0
        print(
            f"evaluate ({mode}): scored {len(evalset)} images in {took:.1f} s ({len(evalset) / max(took, 1e-9):.0f} "
            "img/s)",
            file=sys.stderr,
        )
    return lp, lp_obs


def _metrics_header(bundle: Any, predictor: Any, evalset: Any, observations: Any) -> dict[str, Any]:
    """metrics.json before any figure: the set, the model, its calibration, the frequency buckets."""
    from linnaeus.inference import eval_metrics

    return {
        "set": {
            "name": evalset.name,
            "rows": len(evalset),
            "calibration_set_id": evalset.set_id,
            "novel_rows": int(evalset.novel.sum()),
            "observations": None if observations is None else len(observations),
        },
        "model": {k: bundle.info.get(k) for k in ("which", "step", "weights_sha256", "source")}
        | {"name": bundle.cfg.MODEL.NAME, "bundle": str(bundle.path) if bundle.path else None},
        "calibration": None
        if not predictor.temperatures
        else {k: bundle.calibration.get(k) for k in ("calibration_set_id", "temperature_by_rank", "per_rank")},
        "frequency_thresholds": {"many": f"> {eval_metrics.MANY_ABOVE}", "few": f"< {eval_metrics.FEW_BELOW}"},
        "metadata": {},
    }


def _risk_curves(lp: dict[str, np.ndarray], evalset: Any, predictor: Any) -> dict[str, tuple]:
    """Per rank, the calibrated risk-coverage curve of the known rows (at most ~200 points, for the plots)."""
    from linnaeus.inference import eval_metrics, evaluation

    curves = {}
    known = ~evalset.novel
    for k in predictor.hierarchy.keys:
        y = evalset.table.targets[k][known]
        lab = y >= 0
        p = evaluation._probs(lp[k][known][lab], predictor.temperatures.get(k, 1.0))
        cov, risk, _ = eval_metrics.risk_coverage(p.max(axis=1), p.argmax(axis=1) == y[lab])
        step = max(len(cov) // 200, 1)
        curves[k] = (cov[::step], risk[::step])
    return curves


def _write_outputs(metrics: dict[str, Any], curves: dict[str, Any], out: Path | None) -> None:
    """The console table; then metrics.json, plots and report.html in ``out``, or metrics as JSON on stdout."""
    from linnaeus.inference import eval_report

    print(eval_report.summary_table(metrics), file=sys.stderr)
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(_clean(metrics), indent=1, default=_json_default))
        plots = eval_report.write_plots(metrics, curves, out)
        eval_report.write_html(json.loads((out / "metrics.json").read_text()), plots, out)
        print(f"evaluate: wrote {out / 'metrics.json'}, {out / 'report.html'}, {len(plots)} plots", file=sys.stderr)
    else:
        print(json.dumps(_clean(metrics), default=_json_default))


def _per_observation(
    predictor: Any,
    policy: Any,
    evalset: Any,
    observations: Any,
    lp_obs: dict[str, np.ndarray],
    names: dict[str, list[str | None]],
    counts: dict[str, np.ndarray] | None,
    keep_results: bool,
) -> tuple[dict[str, Any], list | None]:
    """The per-observation figures of one metadata mode (every figure the per-image block has, over observations
    whose rows agree on their labels), and their typus results when kept for saving or needed by the policy."""
    from linnaeus.inference import eval_observations, evaluation

    keep = observations.agree
    first = observations.first[keep]
    lp = {k: v[keep] for k, v in lp_obs.items()}
    results = None
    if policy.kind == "cost" or keep_results:
        results = _results(predictor, lp, policy, [str(i) for i in observations.ids[keep]])
    figs = evaluation.figures(
        lp,
        {k: v[first] for k, v in evalset.table.targets.items()},
        {k: v[first] for k, v in evalset.taxa.items()},
        evalset.novel[first],
        predictor.hierarchy,
        names,
        predictor.temperatures,
        policy,
        counts,
        decisions_from_results(results, predictor) if policy.kind == "cost" else None,
    )
    return eval_observations.observation_summary(predictor, observations) | figs, results if keep_results else None


def _save_observation_predictions(path: Path, predictor: Any, evalset: Any, observations: Any, results: list) -> None:
    """One line per observation (``predict --observations``'s format): its typus result, the photos it combined."""
    from linnaeus.inference.observations import result_line, views_combined
    from linnaeus.inference.typus_output import observation_context

    pooled, mode, temperature = views_combined(predictor)
    kept = np.flatnonzero(observations.agree)
    with open(path, "w") as fh:
        for j, result in zip(kept, results, strict=True):
            photos = [str(evalset.table.paths[i]) for i in observations.rows_of(int(j))]
            context = observation_context(photos, pooled, mode, temperature)
            fh.write(result_line(str(observations.ids[j]), result.model_copy(update={"input_context": context})) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """NaN / inf (an empty bin, no rows in a bucket) as null, so metrics.json is strict JSON."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o
