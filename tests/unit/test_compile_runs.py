"""``MODEL.COMPILE`` in a real training run (issue #28): the model compiles once per distinct input shape, never
again step after step, and stays compiled through checkpoint/resume and beside an EMA copy.

Compiling is counted from the backend dynamo hands each graph to: a recording backend that runs the captured graph
as is (inductor would spend minutes on the CPU; guards, recompiles and graph breaks are dynamo's and the same with
any backend). The demo model compiles to one graph per shape; the run sees two shapes, the training batch and the
validation batch (eval mode).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from linnaeus.config import load_config
from linnaeus.engine.fast_step import CompiledForward

from launch_utils import DEMO_CFG, tiny_opts


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, ...]]]:
    """The input shape of every graph compiled while the test runs (torch.compile's backend replaced)."""
    import torch._dynamo

    seen: list[tuple[int, ...]] = []
    real = torch.compile

    def backend(graph: torch.fx.GraphModule, inputs: list) -> object:
        seen.append(next(tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor) and t.dim() == 4))
        return graph.forward

    monkeypatch.setattr(torch, "compile", lambda f, **kw: real(f, **(kw | {"backend": backend})))
    torch._dynamo.reset()
    yield seen
    torch._dynamo.reset()


def _fit(opts: list[str], per_step: list[int], compiles: list) -> object:
    from benchmarks.trainer_overhead import quiet_trainer
    from linnaeus.engine.trainer import Trainer

    class Counted(Trainer):
        def after_step(self) -> bool:
            stop = super().after_step()
            per_step.append(len(compiles))
            return stop

    with quiet_trainer() as sink:
        trainer = Counted(load_config(DEMO_CFG, opts))
        trainer.setup()
        assert trainer.fit() == 0
    assert "torch.compile failed" not in sink.getvalue()  # no eager fallback
    return trainer


@pytest.mark.slow  # two in-process runs of 12 and 3 steps: ~35 s on an idle 2-core machine
def test_a_compiled_run_compiles_once_per_shape_and_survives_resume_and_ema(
    demo: Path, tmp_path: Path, compiles: list
) -> None:
    import torch._dynamo

    def opts(steps: int) -> list[str]:
        return tiny_opts(
            demo,
            tmp_path,
            name="compiled",
            MODEL__COMPILE=True,
            DATA__BATCH_SIZE=8,  # the validation set (54 images) is one batch of another shape
            TRAIN__MAX_STEPS=steps,
            TRAIN__EMA__ENABLED=True,
            SCHEDULE__METRICS__LOG_INTERVAL_STEPS=4,
            SCHEDULE__VALIDATION__INTERVAL="{STEPS: 4}",  # validations at 4, 8, 12: eval/train switches
            SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 6}",  # a save mid-run (6) and at the end (12)
        )

    per_step: list[int] = []
    trainer = _fit(opts(12), per_step, compiles)
    assert len(per_step) == 12
    train_shape, val_shape = (8, 3, 32, 32), (54, 3, 32, 32)
    assert compiles == [train_shape, val_shape]  # at most one compile per distinct shape
    assert per_step[:3] == [1] * 3 and per_step[3:] == [2] * 9  # the first validation compiles; nothing after
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(model.forward, CompiledForward) and model.forward.compiled is not None
    assert not isinstance(trainer.ema.module.forward, CompiledForward)  # the EMA copy stays eager
    ema_before = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}

    # Resume the same run folder to 15 steps in a fresh process state: compiled again, once per shape.
    torch._dynamo.reset()
    compiles.clear()
    per_step.clear()
    resumed = _fit(opts(15), per_step, compiles)
    assert resumed.step == 15 and len(per_step) == 3
    assert compiles == [train_shape, val_shape]
    model = resumed.accelerator.unwrap_model(resumed.model)
    assert isinstance(model.forward, CompiledForward) and model.forward.compiled is not None
    ema_after = resumed.ema.module.state_dict()
    assert all(torch.isfinite(v).all() for v in ema_after.values() if v.is_floating_point())
    assert any(not torch.equal(ema_before[k], v) for k, v in ema_after.items())  # the EMA kept updating
