"""The fast step (issue #17): compile / channels_last / fused AdamW settings, compile's eager fallback, and a training
step that never reads a value back from the device (the GPU keeps its queue while the host prepares the next step).

On this CPU-only machine the sync audit patches the tensor methods that force a device-to-host read and fails on any
call made directly from Linnaeus code during a training step; on CUDA the same steps run under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from linnaeus.config import load_config
from linnaeus.config.resolve_engine import engine_spec
from linnaeus.engine.fast_step import StepSpeedups, adamw, compile_forward, resolve_auto
from linnaeus.errors import ConfigError

from host_reads import watch
from launch_utils import DEMO_CFG, tiny_opts


# ------------------------------------------------------------------------------------------------ settings
def test_auto_turns_each_speedup_on_for_cuda_only(tmp_path: Path) -> None:
    cfg = load_config(DEMO_CFG, ["EXPERIMENT.OUTPUT_DIR", str(tmp_path)])
    assert (cfg.MODEL.COMPILE, cfg.MODEL.CHANNELS_LAST, cfg.OPTIMIZER.FUSED) == ("auto", "auto", "auto")
    speed = engine_spec(cfg).speedups
    assert StepSpeedups.resolve(speed, torch.device("cuda", 0)) == StepSpeedups(True, True, True, True)
    cpu = StepSpeedups.resolve(speed, torch.device("cpu"))  # the fused AdamW kernel exists on the CPU too
    assert cpu == StepSpeedups(False, False, True, False) and cpu.memory_format == torch.contiguous_format
    assert resolve_auto(True, auto=False) and not resolve_auto(False, auto=True) and resolve_auto("auto", True)
    forced = load_config(DEMO_CFG, ["MODEL.COMPILE", "false", "MODEL.CHANNELS_LAST", "true"])
    forced = engine_spec(forced).speedups
    assert StepSpeedups.resolve(forced, torch.device("cuda")) == StepSpeedups(False, True, True, True)
    # DeepSpeed keeps parameters as views into its flat buffers (it refuses channels_last weights): images only
    zero = StepSpeedups.resolve(forced, torch.device("cuda"), uses_deepspeed=True)
    assert zero.channels_last and not zero.channels_last_weights and zero.memory_format == torch.channels_last


def test_a_bad_speed_setting_is_one_line_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEMO_CFG, ["MODEL.CHANNELS_LAST", "sometimes"])
    assert str(err.value) == "MODEL.CHANNELS_LAST (from --opts): expected true, false or auto, got 'sometimes'"


# ------------------------------------------------------------------------------------------------ compile
def _tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GELU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))


def test_a_failing_compile_warns_once_and_the_model_runs_eagerly(caplog: pytest.LogCaptureFixture) -> None:
    net, x = _tiny_net(), torch.randn(2, 3, 8, 8)
    expected = net(x)
    calls = []

    def broken_backend(graph, inputs):
        calls.append(1)
        raise RuntimeError("inductor cannot build this kernel")

    wrapper = compile_forward(net, backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="linnaeus"):
        first, second = net(x), net(torch.randn(3, 3, 8, 8))  # a new shape would compile again: it does not
    assert torch.equal(first, expected) and second.shape == (3, 2)
    assert wrapper.compiled is None and len(calls) == 1
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "inductor cannot build this kernel" in warnings[0] and "\n" not in warnings[0]
    first.sum().backward()  # the eager rerun is a normal autograd graph
    assert all(p.grad is not None for p in net.parameters())


def test_a_compiled_forward_keeps_names_and_copies_eagerly() -> None:
    net, x = _tiny_net(), torch.randn(2, 3, 8, 8)
    expected = net(x)
    names = list(net.state_dict())
    seen = []

    def recording_backend(graph, inputs):
        seen.append(graph)
        return graph.forward

    compile_forward(net, backend=recording_backend)
    assert torch.allclose(net(x), expected) and len(seen) >= 1  # the compiled path ran
    assert list(net.state_dict()) == names  # checkpoints of a compiled run load into an eager model and back
    twin = copy.deepcopy(net)  # e.g. an EMA copy made later: eager, its own weights
    assert twin.forward.__self__ is twin and torch.allclose(twin(x), expected)
    errors = (KeyError, ValueError)  # not compile errors: they reach the caller unchanged

    def failing_forward(*args):
        raise KeyError("taxa_L10")

    broken = torch.nn.Linear(2, 2)
    broken.forward = failing_forward  # type: ignore[method-assign]
    compile_forward(broken, backend="eager")
    with pytest.raises(errors):
        broken(torch.randn(1, 2))


# ------------------------------------------------------------------------------------------------ fused AdamW
def test_fused_adamw_takes_the_same_steps_as_the_default_kernel() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    opt_a = adamw([{"params": a.parameters()}], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=False)
    opt_b = adamw([{"params": b.parameters()}], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=True)
    assert opt_b.defaults["fused"] is True and not opt_a.defaults["fused"]
    for _ in range(5):
        x = torch.randn(4, 16)
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    opt_a.load_state_dict(opt_b.state_dict())  # the state layout is the same: resumes may switch FUSED


# ------------------------------------------------------------------------------------------------ host syncs
# What counts as a host read, and which reads are host-side on every device: tests/host_reads.py.


# Every optional per-step feature at once: mixing at every step (both algorithms), erasing, partial metadata masking,
# null masking, GradNorm at every step, EMA, gradient accumulation.
EVERY_FEATURE = {
    "SCHEDULE__MIX__PROB": "{ENABLED: True, START_PROB: 1.0, END_PROB: 1.0}",
    "SCHEDULE__MIX__MIXUP__ENABLED": True,
    "SCHEDULE__MIX__CUTMIX__ENABLED": True,
    "AUG__RANDOM_ERASE__PROB": 0.5,
    "SCHEDULE__META_MASKING__PARTIAL__ENABLED": True,
    "SCHEDULE__NULL_MASKING__ENABLED": True,
    "LOSS__GRADNORM__ENABLED": True,
    "LOSS__GRADNORM__UPDATE_INTERVAL": 1,
    "TRAIN__EMA__ENABLED": True,
    "TRAIN__ACCUMULATION_STEPS": 2,
}


@pytest.fixture(params=["demo", "every_feature"])
def step_ready_trainer(request: pytest.FixtureRequest, demo: Path, tmp_path: Path) -> Iterator[object]:
    from benchmarks.trainer_overhead import quiet_trainer
    from linnaeus.engine.trainer import Trainer

    opts = tiny_opts(
        demo,
        tmp_path,
        name="sync",
        TRAIN__MAX_STEPS=100,  # nothing is logged, validated or saved in the steps below
        SCHEDULE__METRICS__LOG_INTERVAL_STEPS=50,
        TRAIN__CLIP_GRAD=1.0,
        DATA__BATCH_SIZE=8,
        **(EVERY_FEATURE if request.param == "every_feature" else {}),
    )
    with quiet_trainer():
        trainer = Trainer(load_config(DEMO_CFG, opts))
        trainer.setup()
        trainer._begin()
        yield trainer


def _windows(trainer):
    from linnaeus.engine.windows import accumulation_windows

    return accumulation_windows(trainer.train_batches, trainer.plan, start_step=trainer.step)


@contextlib.contextmanager
def host_reads() -> Iterator[list[str]]:
    """Records every host read (``host_reads.READS``) charged to Linnaeus code outside ``host_reads.HOST_SIDE``,
    made directly or through torch, accelerate or DeepSpeed on its behalf."""
    found: list[str] = []
    undo = watch(found.append)
    try:
        yield found
    finally:
        undo()


def test_a_training_step_never_reads_back_from_the_device(step_ready_trainer) -> None:
    trainer = step_ready_trainer
    windows = _windows(trainer)
    trainer.train_step(next(windows))  # first step: lazy setup is allowed to look at values
    assert not trainer.after_step()
    with host_reads() as found:
        for _ in range(3):
            trainer.train_step(next(windows))
            assert not trainer.after_step()
    assert found == [], "host reads inside the training step:\n" + "\n".join(found)
    assert trainer.step == 4


@pytest.mark.parametrize("step_ready_trainer", ["demo"], indirect=True)
def test_the_audit_reports_a_step_that_waits_for_the_device(step_ready_trainer) -> None:
    """The audit can fail: TRAIN.NONFINITE skip must read its flags before the optimizer step, and is reported."""
    trainer = step_ready_trainer
    windows = _windows(trainer)
    trainer.nonfinite.mode = "skip"
    with host_reads() as found:
        trainer.train_step(next(windows))
    # exactly one read per optimizer step, and it is the guard's
    assert len(found) == 1 and found[0].startswith("engine/nonfinite.py:") and " check() " in found[0], found


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("step_ready_trainer", ["every_feature"], indirect=True)
def test_cuda_steps_run_under_sync_debug_mode_error(step_ready_trainer) -> None:
    trainer = step_ready_trainer
    windows = _windows(trainer)
    trainer.train_step(next(windows))
    trainer.after_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.train_step(next(windows))
            trainer.after_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
