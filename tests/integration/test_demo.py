"""The README's demo: the exact command trains on the embedded demo dataset, learns every rank far above chance,
and shows that metadata matters (the masked pass loses species accuracy on the look-alike pairs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launch_utils import ROOT, ensure_demo, launch, metrics, run_dir, tiny_opts

pytestmark = pytest.mark.slow

README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(python3\.11 -m venv .*?)\n```", README)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    demo_cmd, test_cmd = readme_commands()[:2]
    assert "pytest" in test_cmd and "accelerate launch" in demo_cmd
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_readme_demo_command_learns(tmp_path_factory) -> None:
    demo_cmd = readme_commands()[0]
    launch_part = demo_cmd.split("&& .venv/bin/accelerate launch ", 1)[1]
    assert launch_part == (
        "--config_file accelerate_configs/cpu_zero2.yaml -m linnaeus.train --cfg configs/experiments/demo.yaml"
    )
    data = ensure_demo(tmp_path_factory.getbasetemp(), per_species=200)  # what `linnaeus demo-data` writes
    out = tmp_path_factory.mktemp("demo_out")
    opts = [
        "DATA.H5.LABELS_PATH",
        str(data / "labels.h5"),
        "DATA.HYBRID.IMAGES_DIR",
        str(data / "images"),
        "DATA.TAXONOMY_PATH",
        str(data / "taxonomy.json"),
        "EXPERIMENT.OUTPUT_DIR",
        str(out),
    ]
    launch(opts, "cpu_zero2", timeout=900)
    run = Path(out) / "linnaeus_demo" / "cpu" / "demo"
    val = metrics(run, "val")[-1]
    masked = metrics(run, "val_mask_meta")[-1]
    # Chance: 1/12 species, 1/4 genera, 1/2 families.
    assert val["taxa_L10/top1"] >= 0.80, val
    assert val["taxa_L20/top1"] >= 0.85, val
    assert val["taxa_L30/top1"] >= 0.90, val
    assert val["chain_accuracy"] >= 0.75, val
    # Two species pairs differ only by range or season: without metadata the model must lose them.
    assert masked["taxa_L10/top1"] <= val["taxa_L10/top1"] - 0.10, (val, masked)


def test_the_demo_console_is_quiet(tmp_path: Path) -> None:
    """A short run of the README's launch with more loader workers than cores: no runpy RuntimeWarning from the
    workers' start, no torch DataLoader worker-count warning; our own clamp line once where it applies."""
    import os

    data = ensure_demo(tmp_path, per_species=8)
    opts = tiny_opts(
        data,
        tmp_path / "out",
        DATA__NUM_WORKERS=4,
        TRAIN__MAX_STEPS=4,
        SCHEDULE__VALIDATION__INTERVAL="{STEPS: 2}",
    )
    proc = launch(opts, "cpu_zero2", timeout=600)
    # accelerate's launcher warns when its default port is taken by another job on the machine (not ours to settle)
    lines = (proc.stdout + proc.stderr).splitlines()
    port = [i for i, line in enumerate(lines) if "is already in use. Accelerate will attempt" in line]
    console = "\n".join(line for i, line in enumerate(lines) if i not in port and i - 1 not in port)
    assert "RuntimeWarning" not in console, console[-3000:]
    assert "DataLoader will create" not in console, console[-3000:]
    assert "Warning" not in console, console[-3000:]
    assert "No CUDA runtime is found" not in console, console[-3000:]
    assert len(metrics(run_dir(tmp_path / "out"), "val")) >= 2  # the loaders' workers started more than once
    clamp = console.count("DATA.NUM_WORKERS 4 is more than the")
    assert clamp == (1 if len(os.sched_getaffinity(0)) < 4 else 0), console[-3000:]
