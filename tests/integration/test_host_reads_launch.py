"""No host reads in a steady-state step of a real 2-process launch (issue #28), DDP and ZeRO-2.

``tests/host_read_entry.py`` patches ``torch.Tensor``'s read methods inside each rank (``tests/host_reads.py``) and
runs ``linnaeus.train``'s main; every read charged to Linnaeus code (directly or through torch, accelerate or
DeepSpeed) is recorded against its optimizer step. A steady-state step (one that neither logs, validates,
checkpoints nor unfreezes) must read nothing, on either rank. One launch per launcher: each runs every per-step
feature with the non-finite guard in its default mode (stop), with mixing drawn at probability 0.5 and GradNorm
updated every other step, so steps with and without mixing and GradNorm are both audited; EMA and gradient
accumulation are on throughout (the plain step is audited in process by tests/unit/test_fast_step.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from launch_utils import ACCELERATE, DEMO_CFG, ROOT, env, tiny_opts

ENTRY = ROOT / "tests" / "host_read_entry.py"
STEPS = 12

EVERY_FEATURE = {
    "SCHEDULE__MIX__PROB": "{ENABLED: True, START_PROB: 0.5, END_PROB: 0.5}",
    "SCHEDULE__MIX__MIXUP__ENABLED": True,
    "SCHEDULE__MIX__CUTMIX__ENABLED": True,
    "AUG__RANDOM_ERASE__PROB": 0.5,
    "SCHEDULE__META_MASKING__PARTIAL__ENABLED": True,
    "SCHEDULE__NULL_MASKING__ENABLED": True,
    "LOSS__GRADNORM__ENABLED": True,
    "LOSS__GRADNORM__UPDATE_INTERVAL": 2,
    "TRAIN__EMA__ENABLED": True,
    "TRAIN__ACCUMULATION_STEPS": 2,
    "TRAIN__CLIP_GRAD": 1.0,
}


def launch_counted(launcher: str, opts: list[str], out: Path) -> subprocess.CompletedProcess:
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / f"{launcher}.yaml"),
        str(ENTRY),
        str(out),
        "--cfg",
        str(DEMO_CFG),
        "--opts",
        *opts,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


# GradNorm under ZeRO-2 fails inside DeepSpeed today (its gradient-partition hooks fire during GradNorm's
# autograd.grad: IndexError in reduce_ipg_grads), so that launch audits everything else.
ZERO2_FEATURES = {k: v for k, v in EVERY_FEATURE.items() if not k.startswith("LOSS__GRADNORM")}
# DeepSpeed's own optimizer step (run inside backward) reads its overflow flag and the validity of its gradient
# norm on the host (bf16 with its default check_grad_overflow, fp32, and clipping): DeepSpeed's cost, stated in
# README.md. These, and only these, are allowed inside a ZeRO step; Linnaeus itself reads nothing.
DEEPSPEED_STEP_READS = ("is_invalid_grad_norm() Tensor.__bool__", "has_overflow() Tensor.item")


def deepspeeds_own(read: str) -> bool:
    return " via deepspeed/runtime/" in read and read.endswith(DEEPSPEED_STEP_READS)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["cpu_ddp", "cpu_zero2"])
def test_steady_state_steps_read_nothing_on_the_host(demo: Path, tmp_path: Path, launcher: str) -> None:
    features = EVERY_FEATURE if launcher == "cpu_ddp" else ZERO2_FEATURES
    opts = tiny_opts(
        demo,
        tmp_path,
        name="reads",
        DATA__BATCH_SIZE=8,
        TRAIN__MAX_STEPS=STEPS,
        SCHEDULE__METRICS__LOG_INTERVAL_STEPS=5,
        SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 8}",
        **features,
    )
    out = tmp_path / "reads"
    proc = launch_counted(launcher, opts, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank in (0, 1):
        rows = json.loads((out / f"rank{rank}.json").read_text())["rows"]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert {r["step"] for r in rows if r["boundary"]} == {5, 8, 10, 12}
        # the first step sets up lazily (compiles, sizes buffers); every other non-boundary step is steady
        steady = [r for r in rows if not r["boundary"] and r["step"] > 1]
        assert len(steady) == 7
        zero = launcher == "cpu_zero2"
        reads = {r["step"]: [x for x in r["reads"] if not (zero and deepspeeds_own(x))] for r in steady}
        reads = {step: found for step, found in reads.items() if found}
        assert reads == {}, f"rank {rank}: host reads in steady-state steps: {json.dumps(reads, indent=1)}"
        # the count sees reads where there are some: logging a row reads the window's sums
        assert any(r["reads"] for r in rows if r["boundary"]), rows
