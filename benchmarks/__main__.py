"""``python -m benchmarks [--quick] [--only NAME,...] [--json OUT]``: the CPU benchmark suite, one entry point.

Each benchmark runs in its own Python process (a crash, a leaked worker or a process group in one cannot disturb
the next), writes its own deterministic data to a temporary folder, and prints every comparison as per-variant
medians over interleaved repeats plus the ratios. A summary of all ratios and targets closes the run; ``--json``
writes everything, raw samples included. Full suite < 10 min on 2 cores, ``--quick`` about 5 min (measured; a
run on cores other work shares takes longer). The header says what to expect before anything runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, format_comparison, machine_info


@dataclass(frozen=True)
class Entry:
    module: str
    what: str
    # Benchmarks written as standalone scripts by their own authors run through their CLI ("external"); ours expose
    # run(quick) -> list[Comparison].
    external: bool = False
    quick_args: tuple[str, ...] = ()
    full_args: tuple[str, ...] = ()
    # (substring of a reported ratio's name, threshold): targets for external reports.
    targets: tuple[tuple[str, float], ...] = field(default_factory=tuple)


BENCHMARKS: dict[str, Entry] = {
    "decode": Entry(
        "benchmarks.decode_cpu",
        "JPEG decode: full vs reduced-size (draft), ours vs tight loop",
        external=True,
        quick_args=("--quick",),
    ),
    "input": Entry("benchmarks.input_pipeline", "our loader vs a naive per-image loader vs the decode ceiling"),
    "shards": Entry(
        "benchmarks.shards_cpu",
        "WebDataset shards vs files, warm and with per-open latency",
        external=True,
        quick_args=("--quick",),
    ),
    "model": Entry("benchmarks.model_cpu", "model forward+backward throughput", external=True, quick_args=("--quick",)),
    "overhead": Entry("benchmarks.trainer_overhead", "Trainer step vs a minimal hand-written loop"),
    "scaling": Entry("benchmarks.scaling", "1 vs 2 processes (DDP) and DDP vs ZeRO-1/2/3, real launches"),
    "e2e": Entry("benchmarks.end_to_end", "loader + model step: data-wait share"),
    "evaluate": Entry("benchmarks.evaluate_cpu", "linnaeus evaluate vs plain predict on the same images"),
    "multiview": Entry("benchmarks.multiview", "multi-view (observation) vs image training, images/s"),
}


# ---------------------------------------------------------------------------------------------------- child side
def _collect_ratios(obj: Any, path: str = "") -> dict[str, float]:
    """Every number under a ``ratios`` key of an external report, named by its path in the report."""
    found: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            sub = f"{path}/{key}" if path else str(key)
            if key == "ratios" and isinstance(value, dict):
                found.update(
                    {f"{path}: {k}" if path else k: float(v) for k, v in value.items() if isinstance(v, int | float)}
                )
            else:
                found.update(_collect_ratios(value, sub))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found.update(_collect_ratios(value, f"{path}[{i}]"))
    return found


def _supported_flags(module: str) -> set[str]:
    """Which of our conventional flags a standalone script accepts (read from its source, without running it)."""
    spec = importlib.util.find_spec(module)
    source = Path(spec.origin).read_text() if spec and spec.origin else ""
    return {flag for flag in ("--quick", "--json") if f'"{flag}"' in source}


def _run_external(entry: Entry, quick: bool, workdir: Path) -> dict[str, Any]:
    if importlib.util.find_spec(entry.module) is None:
        path = entry.module.replace(".", "/") + ".py"
        return {"status": "skipped", "reason": f"{path} is not in this checkout yet"}
    flags = _supported_flags(entry.module)
    argv = [a for a in (entry.quick_args if quick else entry.full_args) if not a.startswith("--") or a in flags]
    report_path = workdir / "report.json"
    if "--json" in flags:
        argv += ["--json", str(report_path)]
    mod = importlib.import_module(entry.module)
    takes_argv = bool(inspect.signature(mod.main).parameters)
    if takes_argv:
        rc = mod.main(argv)
    else:  # a script that parses sys.argv itself
        sys.argv = [entry.module, *argv]
        rc = mod.main()
    result: dict[str, Any] = {"status": "ok" if not rc else "error", "argv": argv}
    if rc:
        result["error"] = f"{entry.module} exited with {rc}"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if isinstance(report.get("comparisons"), list):  # written with benchmarks.common.Comparison.to_dict
            result["comparisons"] = report["comparisons"]
            return result
        result["report"] = report
        result["ratios"] = _collect_ratios(report)
        result["targets"] = [
            {
                "label": f"{name} >= {threshold:g}",
                "value": value,
                "threshold": threshold,
                "higher": True,
                "met": value >= threshold,
            }
            for pattern, threshold in entry.targets
            for name, value in result["ratios"].items()
            if pattern in name
        ]
    else:
        result["note"] = "no JSON report (the script has no --json); its printed output above is the result"
    return result


def run_child(name: str, quick: bool, out: Path) -> int:
    entry = BENCHMARKS[name]
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=f"linnaeus-bench-{name}-") as tmp:
            if entry.external:
                result = _run_external(entry, quick, Path(tmp))
            else:
                comps = importlib.import_module(entry.module).run(quick)
                for comp in comps:
                    print(format_comparison(comp), flush=True)
                result = {"status": "ok", "comparisons": [c.to_dict() for c in comps]}
    except Exception as err:  # recorded, and the suite goes on with the next benchmark
        result = {"status": "error", "error": f"{type(err).__name__}: {err}"}
        print(f"   error: {result['error']}", flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------------- parent side
def _summary_rows(results: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for name, res in results.items():
        if res.get("status") != "ok":
            rows.append(f"{name}: {res.get('status', '?')}: {res.get('reason') or res.get('error', '')}")
            continue
        for comp in res.get("comparisons", []):
            rows.append(f"{name}: {comp['name']}")
            rows += [f"    {label:<62} {value:8.3f}" for label, value in comp["ratios"].items()]
            for t in comp["targets"]:
                op = ">=" if t["higher"] else "<="
                verdict = "MET" if t["met"] else "MISSED"
                rows.append(f"    target {t['label']:<55} {t['value']:8.3f} {op} {t['threshold']:g} {verdict}")
        if res.get("ratios"):
            rows.append(f"{name}:")
            rows += [f"    {label:<62} {value:8.3f}" for label, value in res["ratios"].items()]
        for t in res.get("targets", []):
            rows.append(f"    target {t['label']:<55} {t['value']:8.3f} {'MET' if t['met'] else 'MISSED'}")
        if "note" in res:
            rows.append(f"{name}: ({res['note']})")
    return rows


# What a whole run takes (all benchmarks) on 2 cores (--quick: as measured by a user, issue 27); said up front.
EXPECTED = {True: "about 5 min on 2 cores", False: "under 10 min on 2 cores"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"smaller data and fewer repeats ({EXPECTED[True]})")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    p.add_argument("--json", type=Path, default=None, help="write all results (with raw samples) here")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per benchmark")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        return run_child(args.child, args.quick, args.result)

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(
            f"error: --only: unknown benchmark(s) {', '.join(unknown)}; expected some of {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 2

    info = machine_info()
    print(
        f"Linnaeus CPU benchmarks ({'quick' if args.quick else 'full'}): {info['cpu']}, {info['cores']} cores, "
        f"torch {info['torch']}, Pillow {info['pillow']}, Python {info['python']}",
        flush=True,
    )
    print("Each comparison: per-variant min/median/max over interleaved repeats, then ratios of medians.", flush=True)
    if len(names) == len(BENCHMARKS):  # the estimate is for the whole suite
        print(f"Expect {EXPECTED[args.quick]}.", flush=True)
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="linnaeus-bench-") as tmp:
        for name in names:
            entry = BENCHMARKS[name]
            print(f"\n== {name}: {entry.what}", flush=True)
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, "-m", "benchmarks", "--child", name, "--result", str(out)]
            cmd += ["--quick"] if args.quick else []
            try:
                proc = subprocess.run(cmd, cwd=ROOT, timeout=args.timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
            if out.is_file():
                results[name] = json.loads(out.read_text())
            else:
                why = f"timed out after {args.timeout} s" if rc is None else f"process exited with {rc}"
                results[name] = {"status": "error", "error": why}
                print(f"   error: {why}", flush=True)
            print(f"   ({name}: {results[name].get('seconds', '?')} s)", flush=True)

    total = time.perf_counter() - started
    print(f"\n== summary ({total:.0f} s)")
    for row in _summary_rows(results):
        print(row)
    if args.json:
        doc = {"machine": info, "quick": args.quick, "seconds": round(total, 1), "benchmarks": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = args.json.with_name(args.json.name + ".tmp")
        tmp_path.write_text(json.dumps(doc, indent=1) + "\n")
        tmp_path.replace(args.json)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
