"""`linnaeus bench` measures the user's own input pipeline and the data-wait share of a real training step."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from launch_utils import DEMO_CFG, ROOT, env, tiny_opts


def test_bench_reports_loader_throughput_and_wait_share(demo: Path, tmp_path_factory) -> None:
    out = tmp_path_factory.mktemp("bench")
    linnaeus = str(Path(sys.executable).with_name("linnaeus"))
    proc = subprocess.run(
        [
            linnaeus,
            "bench",
            "--cfg",
            str(DEMO_CFG),
            "--batches",
            "4",
            "--workers",
            "1",
            "--json",
            "--opts",
            *tiny_opts(demo, out),
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["loader_images_per_sec"] > 0
    assert report["workers"] == 1 and report["batch_size"] == 16
    assert 0.0 <= report["data_wait_share"] <= 1.0
    # the count announced is the count timed (each phase has one warm-up batch besides), with time estimates
    assert report["train_steps_timed"] == 4
    assert "bench: timing the loader, 4 batches of 16 with 1 workers, then 4 training steps" in proc.stderr
    assert "timing 4 training steps" in proc.stderr
    assert "bench: loader about " in proc.stderr and "bench: training steps about " in proc.stderr


def test_bench_never_announces_more_steps_than_it_times(demo: Path, tmp_path_factory) -> None:
    """More batches requested than one epoch holds: the announced count is the one timed and reported."""
    out = tmp_path_factory.mktemp("bench_short")
    linnaeus = str(Path(sys.executable).with_name("linnaeus"))
    proc = subprocess.run(
        [linnaeus, "bench", "--cfg", str(DEMO_CFG), "--batches", "500", "--workers", "0", "--opts",
         *tiny_opts(demo, out, DATA__BATCH_SIZE=64)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(
        r"then (\d+) training steps, each after one warm-up batch \(one epoch holds (\d+) batches\)", proc.stderr
    )
    assert m is not None, proc.stderr
    assert int(m[1]) == int(m[2]) - 1 < 500
    assert f"timing {m[1]} training steps" in proc.stderr
    assert f"of step time over {m[1]} training steps" in proc.stdout


def test_bench_summary_reads_as_text() -> None:
    from linnaeus.commands.bench import summary

    report = {
        "device": "cpu",
        "workers": 2,
        "batch_size": 16,
        "img_size": 32,
        "loader_images_per_sec": 512.25,
        "loader_images_per_sec_per_worker": 256.1,
        "train_steps_timed": 9,
        "data_wait_share": 0.35,
    }
    text = summary(report)
    assert "loader            512.2 img/s (256.1 per worker)" in text
    assert "data wait         35.0% of step time over 9 training steps" in text
    assert "raise DATA.NUM_WORKERS" in text
    assert "keeps up" in summary({**report, "data_wait_share": 0.05})
