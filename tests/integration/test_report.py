"""End-of-run report, plots and `linnaeus plot`: on hand-written metrics (crash repeats, torn lines) and on the run
folder of a real tiny training."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from linnaeus.engine.plots import draw_plots
from linnaeus.engine.report import (
    Timings,
    build_report,
    format_table_with_history,
    read_metrics,
    update_bests,
    write_report,
)

from launch_utils import PY, ROOT, ensure_demo, env, launch, metrics, run_dir, tiny_opts

PLOTS = {"loss", "lr", "val_top1", "chain_accuracy", "metadata_gap", "images_per_sec"}


def _val(step: int, top1: float, chain: float) -> dict:
    return {
        "step": step,
        "epoch": step / 10,
        "phase": "val",
        "a/top1": top1,
        "a/top5": min(1.0, top1 + 0.2),
        "a/loss": 1.0 - top1,
        "a/coverage": 1.0,
        "chain_accuracy": chain,
        "partial_chain_accuracy": chain,
        "loss": 1.0 - top1,
        "samples": 10.0,
    }


def _write_run(run: Path, lines: list[str], best_metric: str = "val/chain_accuracy", mode: str = "max") -> Path:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("\n".join(lines))
    (run / "config.yaml").write_text(
        f"SCHEDULE:\n  CHECKPOINT:\n    BEST_METRIC: {best_metric}\n    BEST_MODE: {mode}\n"
    )
    return run


def test_crash_repeats_keep_the_last_row_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    rows = [
        {"step": 1, "epoch": 0.1, "phase": "train", "loss": 3.0, "lr": 0.1, "images_per_sec": 10.0, "a/loss": 3.0},
        _val(2, 0.5, 0.9),  # written before a crash; the resumed run re-did step 2 and wrote 0.4 / 0.3
        _val(2, 0.4, 0.3),
        _val(4, 0.6, 0.5),
        {**_val(4, 0.1, 0.2), "phase": "val_mask_meta"},
    ]
    lines = [json.dumps(r) for r in rows] + ['{"step": 6, "epoch": 0.6, "pha']
    run = _write_run(tmp_path / "run", lines)
    got = read_metrics(run / "metrics.jsonl")
    assert [(r["phase"], r["step"]) for r in got] == [("train", 1), ("val", 2), ("val", 4), ("val_mask_meta", 4)]
    assert [r["a/top1"] for r in got if r["phase"] == "val"] == [0.4, 0.6]

    report = build_report(run)
    assert report["ranking"] == {"metric": "val/chain_accuracy", "mode": "max", "best": 0.5, "best_step": 4}
    assert report["ranks"]["a"]["best_top1"] == 0.6 and report["ranks"]["a"]["final_top1"] == 0.6
    assert report["metadata_masked_gap"]["step"] == 4
    assert report["metadata_masked_gap"]["chain_accuracy"] == pytest.approx(0.3)
    assert report["timings"]["mean_images_per_sec"] == 10.0


def test_min_mode_ranks_by_the_lowest_value(tmp_path: Path) -> None:
    run = _write_run(
        tmp_path / "run",
        [json.dumps(_val(s, t, 0.1)) for s, t in [(1, 0.2), (2, 0.7), (3, 0.5)]],
        best_metric="val/loss",
        mode="min",
    )
    assert build_report(run)["ranking"]["best"] == pytest.approx(0.3)
    assert build_report(run)["ranking"]["best_step"] == 2


def test_summary_has_timings_and_paths(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", [json.dumps(_val(2, 0.5, 0.4))])
    (run / "export").mkdir()
    (run / "export" / "best.safetensors").write_bytes(b"x")
    text = write_report(run, Timings(3725.0, {"train": 3600.0, "validation": 100.0}, 123.4, 0.25), plots=False)
    assert "best val/chain_accuracy = 0.4000 at step 2" in text
    assert "total 1h02m05s" in text and "123.4 img/s" in text and "data wait 25%" in text
    assert str(run / "export" / "best.safetensors") in text
    assert f"linnaeus export --run {run}" in text
    saved = json.loads((run / "report.json").read_text())
    assert saved["timings"]["phase_seconds"] == {"train": 3600.0, "validation": 100.0}
    assert "<html>" in (run / "report.html").read_text()


def test_table_shows_change_and_best_so_far() -> None:
    first = _val(2, 0.5, 0.4)
    second = _val(4, 0.3, 0.6)
    bests = update_bests({}, first)
    table = format_table_with_history("validation", 4, second, ["a"], previous=first, best=bests)
    row = next(line for line in table.splitlines() if line.startswith("a "))
    # top1 fell 0.2 and the best stays 0.5; chain accuracy rose 0.2 and is the new best.
    assert row.split()[1:4] == ["0.300", "-0.200", "0.500"]
    assert "chain accuracy 0.600 (change +0.200, best 0.600)" in table
    first_table = format_table_with_history("validation", 2, first, ["a"])
    assert first_table.splitlines()[2].split()[1:4] == ["0.500", "-", "0.500"]
    assert update_bests({"loss": 0.5}, {"loss": 0.7, "a/loss": 0.2})["loss"] == 0.5


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("report_run")
    demo = ensure_demo(tmp_path_factory.getbasetemp(), per_species=8)
    opts = tiny_opts(
        demo,
        base,
        SCHEDULE__VALIDATION__INTERVAL="{STEPS: 2}",
        SCHEDULE__VALIDATION__MASK_META_INTERVAL="{STEPS: 3}",
        SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 3}",
    )
    launch(opts)
    return run_dir(base)


def test_report_and_plots_of_a_real_run(real_run: Path) -> None:
    text = write_report(real_run, Timings(total_seconds=12.0))
    report = json.loads((real_run / "report.json").read_text())
    vals = metrics(real_run, "val")
    metric = report["ranking"]["metric"]  # the demo ranks by the species top-1
    assert metric == "val/taxa_L10/top1"
    best = max(r["taxa_L10/top1"] for r in vals)
    assert report["ranking"]["best"] == pytest.approx(best)
    assert report["last_step"] == 6 and report["validations"] == len(vals) == 3
    assert {Path(p).stem for p in report["plots"]} == PLOTS
    assert f"{best:.4f}" in text and f"{best:.4f}" in (real_run / "report.html").read_text()
    assert set(report["weights"]) == {"best", "final"}
    for p in report["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_command_on_a_run_still_being_written(real_run: Path, tmp_path: Path) -> None:
    import shutil

    live = tmp_path / "live"
    shutil.copytree(real_run, live, ignore=shutil.ignore_patterns("plots", "report.*", "checkpoints", "export"))
    with (live / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 7, "epoch": 0.9, "phase": "tra')  # the trainer is mid-write
    proc = subprocess.run(
        [PY, "-m", "linnaeus.cli", "plot", "--run", str(live)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "run at step 6" in proc.stdout
    assert {p.stem for p in (live / "plots").glob("*.png")} == PLOTS
    assert (live / "report.html").is_file()
    assert draw_plots(live)  # idempotent: redrawing replaces the files


def test_plot_command_refuses_a_folder_without_metrics(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PY, "-m", "linnaeus.cli", "plot", "--run", str(tmp_path)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"error: --run: {tmp_path} has no metrics.jsonl (expected a run folder written by `linnaeus train`)"
    )


def test_predict_from_the_run_json_and_table(real_run: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from linnaeus.inference.table import format_result

    images = sorted((ensure_demo(tmp_path_factory.getbasetemp(), per_species=8) / "images").glob("*.jpg"))[:2]
    base = [PY, "-m", "linnaeus.cli", "predict", "--run", str(real_run), *map(str, images), "--top-k", "3"]
    proc = subprocess.run(base, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout: JSON lines only
    assert len(results) == 2
    for result in results:
        for rank in result["ranks"]:
            scores = [c["score"] for c in rank["candidates"]]
            assert scores == sorted(scores, reverse=True)
    assert "\r" not in proc.stderr  # no bar when stderr is not a terminal
    table = subprocess.run(
        [*base, "--format", "table"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300
    )
    assert table.returncode == 0, table.stderr[-2000:]
    assert table.stdout.strip() == "\n\n".join(format_result(r) for r in results)
    block = format_result(results[0]).splitlines()
    assert block[0] == str(images[0]) and block[1].startswith("  chain (p=")
    species = next(line for line in block if line.lstrip().startswith("species"))
    scores = [float(tok.rstrip(",")) for tok in species.split() if tok.rstrip(",").replace(".", "").isdigit()]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3


def test_exported_bundle_weights_are_group_readable(real_run: Path, tmp_path: Path) -> None:
    import os
    import stat

    from linnaeus.inference.bundle import export_bundle
    from linnaeus.utils.io import make_readable

    old = os.umask(0o022)
    try:
        out = export_bundle(str(real_run), str(tmp_path / "bundle"), "best")
        assert stat.S_IMODE((out / "weights.safetensors").stat().st_mode) == 0o644
        os.umask(0o027)
        f = tmp_path / "x.safetensors"
        f.write_bytes(b"")
        f.chmod(0o600)
        make_readable(f)
        assert stat.S_IMODE(f.stat().st_mode) == 0o640  # the umask is respected
    finally:
        os.umask(old)


def test_report_names_ranks_opens_with_the_setup_and_says_what_each_plot_shows(
    real_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.axes import Axes

    from linnaeus.engine.report import PLOT_CAPTIONS

    labels: list[str] = []
    original = Axes.plot

    def spy(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    text = write_report(real_run)
    assert "species (taxa_L10)" in labels and "genus (taxa_L20)" in labels and "taxa_L10" not in labels
    assert "species (taxa_L10) top-1" in labels  # the metadata-gap legend
    assert "  species (taxa_L10)  " in text  # the summary's rank table
    report = json.loads((real_run / "report.json").read_text())
    assert report["rank_labels"]["taxa_L30"] == "family (taxa_L30)"
    setup = report["setup"]
    assert set(setup) >= {"dataset", "classes", "metadata", "model", "training", "config"}
    assert "labels.h5" in setup["dataset"] and "rows: train " in setup["dataset"]
    assert setup["classes"].startswith("species (taxa_L10): 12")
    assert setup["model"].startswith("mFormerV1 (") and "random start" in setup["model"]
    page = (real_run / "report.html").read_text()
    assert page.index("What was trained") < page.index("Summary") < page.index("Plots")
    for stem in PLOTS:
        assert PLOT_CAPTIONS[stem] in page.replace("&#x27;", "'")  # a reading guide under each plot, not its file name
