"""What a run shows and leaves behind: console and log lines, the end-of-run report, trackers, an already finished
run, and a failed start."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from linnaeus.config.resolve_data import data_spec
from linnaeus.engine.schedule import StepPlan
from linnaeus.engine.train_meter import TrainMeter

from launch_utils import DEMO_CFG, PY, ROOT, env, launch, metrics, run_dir, tiny_opts, train_cmd


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_meter_measures_the_share_of_training_time_spent_waiting_for_batches() -> None:
    plan = StepPlan(steps_per_epoch=10, total_steps=100, micro_batch=4, accumulation=1, world_size=1)
    clock = FakeClock()
    meter = TrainMeter(["a"], torch.device("cpu"), plan, log_every=1, clock=clock)
    meter.restart()

    def batches():
        for i in range(3):
            clock.now += 1.0  # one second to produce each batch
            yield i

    for _ in meter.timed(batches()):
        clock.now += 3.0  # three seconds of compute per step
        meter.add(torch.tensor(1.0), {"a": torch.tensor(1.0)})
    with meter.paused():
        clock.now += 100.0  # validation: neither training nor waiting
    row = meter.flush(reduce_sum=None)
    assert row["data_wait_share"] == pytest.approx(3 / 12)
    assert meter.counters.train_seconds == pytest.approx(12.0)
    assert meter.counters.data_wait_share == pytest.approx(0.25)
    assert meter.counters.mean_images_per_sec == pytest.approx(3 * 4 / 12)


def _port() -> list[str]:
    """A free rendezvous port: accelerate otherwise warns (a 4-line warning) when another job holds 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return ["--main_process_port", str(s.getsockname()[1])]


@pytest.mark.slow
def test_two_process_run_reads_well_in_a_file_and_leaves_a_report(demo: Path, tmp_path: Path) -> None:
    opts = tiny_opts(
        demo,
        tmp_path,
        TRAIN__MAX_STEPS=4,
        SCHEDULE__VALIDATION__INTERVAL="{STEPS: 2}",
        EXPERIMENT__TRACKERS="[tensorboard]",
    )
    log_file = tmp_path / "job.out"
    with log_file.open("w") as fh:  # what a SLURM .out gets: no terminal
        proc = subprocess.run(
            train_cmd(opts, "cpu_zero2", _port()), cwd=ROOT, env=env(), stdout=fh, stderr=subprocess.STDOUT, timeout=600
        )
    out = log_file.read_text()
    assert proc.returncode == 0, out[-4000:]
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 400
    assert "\r" not in out  # no bar, not even DeepSpeed's while the weights are consolidated for export
    progress = [line for line in lines if re.search(r"INFO step \d+/4 \(", line)]
    assert [re.search(r"step (\d+)/4", p).group(1) for p in progress] == ["1", "2", "3", "4"]
    assert all("loss " in p and "img/s" in p and "ETA" in p for p in progress)
    assert "2 processes" in out

    run = run_dir(tmp_path)
    train_log = (run / "logs" / "train.log").read_text()
    assert sum(bool(re.search(r"INFO step \d+/4 \(", line)) for line in train_log.splitlines()) == 4
    # Second validation table: change since the first and best so far.
    assert re.search(r"taxa_L10\s+\d\.\d{3}\s+[+-]\d\.\d{3}\s+\d\.\d{3}", out)

    # The report holds the run's best ranking metric, as metrics.jsonl has it.
    report = json.loads((run / "report.json").read_text())
    metric = report["ranking"]["metric"]
    phase, _, key = metric.partition("/")
    vals = [(r[key], r["step"]) for r in metrics(run, phase)]
    best = max(vals, key=lambda t: (t[0], -t[1]))
    assert report["ranking"]["best"] == pytest.approx(best[0]) and report["ranking"]["best_step"] == best[1]
    t = report["timings"]
    assert t["total_seconds"] > 0 and set(t["phase_seconds"]) == {
        "setup",
        "train",
        "validation",
        "checkpoint",
        "export",
    }
    assert t["mean_images_per_sec"] > 0 and 0 <= t["data_wait_share"] <= 1
    assert f"{best[0]:.4f}" in (run / "report.html").read_text()
    assert f"best {metric} = {best[0]:.4f} at step {best[1]}" in out
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"loss.png", "lr.png", "val_top1.png"}
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert json.loads((run / "checkpoints" / "step_4" / "trainer_state.json").read_text())["total_steps"] == 4
    exported = run / "export" / "final.safetensors"
    assert exported.stat().st_mode & 0o044  # readable by the group (umask permitting) and others

    # Rerunning the finished run: one line, exit 0, exports untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run / "export").iterdir()}
    again = launch(opts, "cpu_zero2", timeout=600, extra=_port())
    said = (again.stdout + again.stderr).splitlines()
    assert [line for line in said if "already complete" in line] == [
        next(line for line in said if "already complete" in line)
    ]
    assert "Linnaeus training" not in again.stderr and "exported" not in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (run / "export").iterdir()} == mtimes


def test_wrong_images_dir_fails_with_one_line_before_the_model_and_leaves_no_run_folder(
    demo: Path, tmp_path: Path
) -> None:
    from linnaeus.config import load_config
    from linnaeus.data.prepare import prepare_data
    from linnaeus.errors import ConfigError

    opts = tiny_opts(demo, tmp_path, DATA__HYBRID__IMAGES_DIR=str(tmp_path / "no_such_folder"))
    # The data preflight (which the trainer runs before it builds the model or the run folder) refuses it ...
    with pytest.raises(ConfigError, match=r"DATA\.HYBRID\.IMAGES_DIR: .*no_such_folder is not a directory"):
        prepare_data(data_spec(load_config(DEMO_CFG, opts)), check_images=False)
    # ... and the job says so once, on its own line, and leaves nothing behind.
    proc = subprocess.run(
        [PY, "-m", "linnaeus.train", "--cfg", str(DEMO_CFG), "--opts", *opts],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert said == [f"error: DATA.HYBRID.IMAGES_DIR: {tmp_path / 'no_such_folder'} is not a directory"]
    assert not (tmp_path / "linnaeus_demo").exists()


class Sampler:
    def set_epoch(self, epoch: int) -> None:
        pass


class Guess(torch.nn.Module):
    """A 'model' whose logits are set by the test: the validation tables' numbers are then known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = torch.zeros(4, 3)

    def forward(self, images: torch.Tensor, meta: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"a": self.logits.clone()}


def test_validation_tables_show_change_and_best_and_keep_them_across_a_resume() -> None:
    import io
    import logging

    from linnaeus.engine.validation import Validator
    from linnaeus.specs.engine import Period, ValidationSpec

    batch = {
        "image": torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
        "meta": torch.zeros(4, 0),
        "targets": {"a": torch.tensor([0, 1, 2, 0])},
        "is_pad": torch.zeros(4, dtype=torch.bool),
    }
    plan = StepPlan(steps_per_epoch=10, total_steps=100, micro_batch=4, accumulation=1, world_size=1)

    def validator() -> Validator:
        return Validator(
            [batch], Sampler(), ["a"], ValidationSpec(every=Period(steps=1), mean=(0.5,) * 3, std=(0.5,) * 3),
            device=torch.device("cpu"), dtype=torch.float32, plan=plan,
        )  # fmt: skip

    model, logged = Guess(), []
    first = validator()
    model.logits = torch.eye(3)[[0, 1, 2, 1]] * 5  # 3 of 4 right
    first.maybe_run(1, model, lambda phase, m: logged.append(m))
    resumed = validator()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as trainer_state.json carries it
    model.logits = torch.eye(3)[[0, 2, 2, 1]] * 5  # 2 of 4 right
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    logger = logging.getLogger("linnaeus")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        resumed.maybe_run(2, model, lambda phase, m: logged.append(m))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [m["a/top1"] for m in logged] == [0.75, 0.5]
    row = next(line for line in text.getvalue().splitlines() if line.startswith("a "))
    top1, change, best = row.split()[1:4]
    assert (top1, change, best) == ("0.500", "-0.250", "0.750")
