"""benchmarks/gpu_train.py: the real trainer through accelerate launch, here in its CPU ``--smoke`` form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_train import Variant, make_train_plan, table

from launch_utils import ROOT, env


def test_full_plan_covers_the_issue_matrix() -> None:
    variants = make_train_plan(smoke=False).variants
    names = {v.name for v in variants}
    assert len(names) == len(variants)
    assert {v.launcher for v in variants} == {"single", "ddp", "zero2"}
    assert {v.decode for v in variants} == {"cpu", "device"}
    assert {v.compiled for v in variants} == {True, False}
    assert {v.img_size for v in variants} == {224, 384}
    assert {v.data for v in variants} == {"jpeg500", "jpeg1mp", "shards"}
    # each fast-step setting is measured against its absence, beside the same compiled device-decode run
    base = Variant("single", "device", True, 224, "jpeg500")
    assert base in variants
    assert {v for v in variants if not (v.channels_last and v.fused)} == {
        Variant("single", "device", True, 224, "jpeg500", channels_last=False),
        Variant("single", "device", True, 224, "jpeg500", fused=False),
    }
    assert make_train_plan(smoke=False).workers <= 8


def test_table_marks_missing_values_and_failures() -> None:
    ok = Variant("single", "device", True, 224, "jpeg500").name
    text = table(
        {
            "variants": {
                ok: {"images_per_sec": 1234.4, "mfu_vs_nominal_peak": 0.25, "data_wait_share": None},
                "bad": {"error": "RuntimeError: launch failed"},
            }
        }
    )
    assert f"| {ok} | 1,234 | 25.0% | - | - |" in text
    assert "| bad | RuntimeError: launch failed |" in text


@pytest.mark.slow
def test_smoke_run_launches_the_trainer_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_train", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["errors"] == []
    assert set(res["variants"]) == {v.name for v in make_train_plan(smoke=True).variants}
    for name, run in res["variants"].items():
        assert run["images_per_sec"] > 0, (name, run)
        assert run["logged_windows"] >= 3 and run["gmacs_fwd"] > 0
        assert 0 <= run["fed_vs_compute"] <= 1 and run["fed_vs_compute"] == 1 - run["data_wait_share"]
    assert "| variant | img/s |" in proc.stdout
