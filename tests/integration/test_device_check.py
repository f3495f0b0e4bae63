"""benchmarks/device_check.sh, the one GPU check (issue #28): its ``--smoke`` form runs every step on the CPU and
writes the table; the full form names only variants that gpu_train.py knows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_train import make_train_plan

from launch_utils import ROOT, env

SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def test_the_full_check_runs_known_variants_covering_the_issue() -> None:
    text = SCRIPT.read_text()
    listed = re.search(r'ARGS=\(--variants "([^"]+)"\)', text, re.S)
    assert listed is not None
    names = [n.strip() for n in listed.group(1).replace("\\\n", "").split(",")]
    known = {v.name: v for v in make_train_plan(smoke=False).variants}
    assert names and all(n in known for n in names), [n for n in names if n not in known]
    chosen = [known[n] for n in names]
    assert {v.img_size for v in chosen} == {224}
    assert {v.decode for v in chosen} == {"cpu", "device"} and {v.compiled for v in chosen} == {True, False}
    assert {"ddp", "zero2"} <= {v.launcher for v in chosen} and {"jpeg500", "shards"} <= {v.data for v in chosen}


@pytest.mark.slow
def test_smoke_check_runs_on_the_cpu_and_writes_one_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env() | {"LINNAEUS_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "device_check.md").read_text()
    assert "| variant | img/s | MFU (peak) | MFU (matmul) | data wait | peak GiB | GPU util |" in report
    row = next(line for line in report.splitlines() if line.startswith("| single-jpeg500-32-cpu-eager |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1].replace(",", "")) > 0 and cells[4].endswith("%")  # img/s, data wait
    assert re.search(r"CUDA-only tests \(exit 0\): .*skipped", report)
    assert (out / "gpu_train.json").is_file() and (out / "device_check.log").is_file()
