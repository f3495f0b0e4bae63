"""The training loop's components in-process: accumulation windows over a batch stream, the train meter, metadata
masking and the checkpointer (save, resume point, mapping onto another process count) with a real Accelerator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from linnaeus.aug import MetaMasking
from linnaeus.config import load_config
from linnaeus.config.resolve_engine import engine_spec
from linnaeus.engine.checkpointer import Checkpointer, resume_step
from linnaeus.engine.schedule import StepPlan
from linnaeus.engine.train_meter import TrainMeter
from linnaeus.engine.windows import accumulation_windows
from linnaeus.errors import ConfigError

TASKS = ["taxa_L10", "taxa_L20"]


class ListStream:
    """A BatchStream stand-in whose batches name their position: {"epoch": e, "index": i}."""

    def __init__(self, batches_per_epoch: int) -> None:
        self.batches_per_epoch = batches_per_epoch
        self.positions: list[tuple[int, int]] = []
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.positions.append((epoch, start_batch))
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        for i in range(self.start, self.batches_per_epoch):
            yield {"epoch": self.epoch, "index": i}


def _ids(window: list[dict]) -> list[tuple[int, int]]:
    return [(b["epoch"], b["index"]) for b in window]


# ------------------------------------------------------------------------------------------------ windows
def test_windows_take_whole_accumulation_windows_and_cross_epochs() -> None:
    plan = StepPlan(steps_per_epoch=3, total_steps=100, micro_batch=4, accumulation=2)
    stream = ListStream(batches_per_epoch=7)  # the 7th batch cannot fill a window: never taken
    windows = accumulation_windows(stream, plan)
    got = [_ids(next(windows)) for _ in range(4)]
    assert got == [[(0, 0), (0, 1)], [(0, 2), (0, 3)], [(0, 4), (0, 5)], [(1, 0), (1, 1)]]
    assert stream.positions == [(0, 0), (1, 0)]


def test_windows_resume_mid_epoch_at_the_steps_position() -> None:
    plan = StepPlan(steps_per_epoch=3, total_steps=100, micro_batch=4, accumulation=2)
    stream = ListStream(batches_per_epoch=7)
    windows = accumulation_windows(stream, plan, start_step=4)  # epoch 1, one window consumed
    assert _ids(next(windows)) == [(1, 2), (1, 3)]
    assert _ids(next(windows)) == [(1, 4), (1, 5)]
    assert _ids(next(windows)) == [(2, 0), (2, 1)]
    assert stream.positions == [(1, 2), (2, 0)]


def test_windows_say_when_the_stream_breaks_its_promise() -> None:
    plan = StepPlan(steps_per_epoch=3, total_steps=100, micro_batch=4, accumulation=2)
    windows = accumulation_windows(ListStream(batches_per_epoch=5), plan)
    next(windows), next(windows)
    with pytest.raises(RuntimeError, match="ended inside epoch 0 before step 3"):
        next(windows)


# ------------------------------------------------------------------------------------------------ meter
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _twice(t: torch.Tensor) -> torch.Tensor:
    """An all-reduce sum over two processes that happen to hold the same values."""
    return t * 2


def test_meter_row_is_the_mean_step_loss_and_throughput_leaves_out_pauses() -> None:
    plan = StepPlan(steps_per_epoch=10, total_steps=100, micro_batch=8, accumulation=2, world_size=2)
    clock = Clock()
    meter = TrainMeter(TASKS, torch.device("cpu"), plan, log_every=2, clock=clock)
    meter.restart()
    # Two steps of two micro-batches. A micro-batch's loss is its share of the step loss (x accumulation x world).
    for loss in (4.0, 8.0, 2.0, 6.0):
        meter.add(torch.tensor(loss), {"taxa_L10": torch.tensor(loss / 2), "taxa_L20": torch.tensor(loss / 4)})
    clock.now += 2.0
    with meter.paused():  # a validation: not training time
        clock.now += 50.0
    assert not meter.due(1) and meter.due(2) and meter.due(100)
    row = meter.flush(_twice)
    # Step losses: (4 + 8) x 2 processes / (2 x 2) = 6 and (2 + 6) x 2 / 4 = 4; their mean is 5.
    assert row["loss"] == pytest.approx(5.0)
    assert row["taxa_L10/loss"] == pytest.approx(row["loss"] / 2)
    assert row["taxa_L20/loss"] == pytest.approx(row["loss"] / 4)
    assert row["images_per_sec"] == pytest.approx(4 * 8 * 2 / 2.0)
    clock.now += 1.0
    meter.add(torch.tensor(1.0), {"taxa_L10": torch.tensor(1.0), "taxa_L20": torch.tensor(0.0)})
    assert meter.flush(_twice)["images_per_sec"] == pytest.approx(1 * 8 * 2 / 1.0)  # a fresh window
    clock.now += 1.0
    meter.add(torch.tensor(1.0), {"taxa_L10": torch.tensor(1.0), "taxa_L20": torch.tensor(0.0)}, images=21)
    assert meter.flush(_twice)["images_per_sec"] == pytest.approx(21 * 2 / 1.0)  # 8 observations, 21 photos


def test_meter_counts_unreadable_images_exactly_at_every_save() -> None:
    plan = StepPlan(steps_per_epoch=10, total_steps=100, micro_batch=4, world_size=2)
    meter = TrainMeter(TASKS, torch.device("cpu"), plan, log_every=10, decode_fallbacks=lambda: 3)
    counters = meter.counters
    counters.count_missing({"image_ok": torch.tensor([True, False, False, True])})
    counters.count_missing({"image": torch.zeros(1)})  # a stream without the flag counts nothing
    assert counters.state_dict() == {"missing_images": 0}  # a plain read: nothing summed over processes yet
    counters.sync(_twice)  # before a save between two log steps: both processes' counts
    assert counters.state_dict() == {"missing_images": 4}
    counters.count_missing({"image_ok": torch.tensor([False, True, True, True])})
    meter.add(torch.tensor(1.0), {"taxa_L10": torch.tensor(1.0), "taxa_L20": torch.tensor(0.0)})
    assert meter.flush(_twice)["decode_fallbacks"] == 6  # the decoder's own counter, both processes
    assert counters.missing_images == 6
    counters.sync(_twice)
    assert counters.state_dict() == {"missing_images": 6}  # nothing counted twice
    resumed = TrainMeter(TASKS, torch.device("cpu"), plan, log_every=10).counters
    resumed.load_state_dict({"missing_images": 6, "step": 3})
    resumed.count_missing({"image_ok": torch.tensor([False])})
    resumed.sync(None)
    assert resumed.state_dict() == {"missing_images": 7}


# ------------------------------------------------------------------------------------------------ meta masking
def _meta(b: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(b, 15) + 0.5, torch.ones(b, 3, dtype=torch.bool)


def test_meta_masking_drops_whole_samples_or_whitelisted_groups() -> None:
    masking = MetaMasking(["TEMPORAL", "SPATIAL", "ELEVATION"], [2, 3, 10], [["SPATIAL"], ["TEMPORAL", "NOT_THERE"]])
    meta, valid = _meta()
    gen = torch.Generator().manual_seed(0)
    out, out_valid = masking(meta, valid, p_all=1.0, p_partial=0.0, generator=gen)
    assert (out == 0).all() and not out_valid.any()
    out, out_valid = masking(meta, valid, p_all=0.0, p_partial=1.0, generator=gen)
    spatial_dropped = ~out_valid[:, 1]
    temporal_dropped = ~out_valid[:, 0]
    assert (spatial_dropped ^ temporal_dropped).all()  # exactly one group per sample
    assert out_valid[:, 2].all() and torch.equal(out[:, 5:], meta[:, 5:])  # elevation never in a group
    assert (out[spatial_dropped][:, 2:5] == 0).all() and torch.equal(
        out[~spatial_dropped][:, 2:5], meta[~spatial_dropped][:, 2:5]
    )
    assert (out[temporal_dropped][:, :2] == 0).all()


def test_meta_masking_is_a_function_of_the_generator_and_skips_empty_metadata() -> None:
    masking = MetaMasking(["TEMPORAL", "SPATIAL", "ELEVATION"], [2, 3, 10], [["SPATIAL"]])
    meta, valid = _meta()
    a = masking(meta, valid, p_all=0.3, p_partial=0.5, generator=torch.Generator().manual_seed(7))
    b = masking(meta, valid, p_all=0.3, p_partial=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert 0 < int((~a[1][:, 0]).sum()) < 64
    empty = torch.zeros(4, 0)
    out, _ = MetaMasking([], [])(empty, torch.zeros(4, 0, dtype=torch.bool), p_all=1.0, p_partial=0.0, generator=None)
    assert out is empty


# ------------------------------------------------------------------------------------------------ checkpointer
def test_resume_maps_progress_by_samples_onto_another_layout() -> None:
    saved = {"step": 4, "samples_seen": 128, "world_size": 2, "zero_stage": 2}
    one_process = StepPlan(steps_per_epoch=19, total_steps=100, micro_batch=16)
    assert resume_step(saved, one_process, zero_stage=0) == (8, False)  # 4 x 32 samples = 8 steps of 16
    two_zero2 = StepPlan(steps_per_epoch=9, total_steps=100, micro_batch=16, world_size=2)
    assert resume_step(saved, two_zero2, zero_stage=2) == (4, True)
    assert resume_step(saved, two_zero2, zero_stage=3) == (4, False)
    accumulating = StepPlan(steps_per_epoch=4, total_steps=100, micro_batch=8, accumulation=3)
    assert resume_step(saved, accumulating, zero_stage=0) == (5, False)  # 128 // 24: whole steps only


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"counter": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["counter"]


def test_checkpointer_saves_components_and_bests_then_restores_them(tmp_path: Path) -> None:
    from accelerate import Accelerator

    cfg = load_config(
        None,
        [
            "TRAIN.AUTO_RESUME",
            "True",
            "SCHEDULE.CHECKPOINT.INTERVAL",
            "{STEPS: 3}",
            "SCHEDULE.CHECKPOINT.BEST_METRIC",
            "val/taxa_L10/top1",
        ],
    )
    plan = StepPlan(steps_per_epoch=10, total_steps=20, micro_batch=4, accumulation=2)
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = acc.prepare(model, opt)
    ckpt = Checkpointer(acc, tmp_path / "checkpoints", engine_spec(cfg).checkpoint, plan, zero_stage=0)
    ckpt.prepare_folder()
    counter = Counter()
    ckpt.register("counter", counter)
    assert ckpt.find_resume() is None
    assert [s for s in range(1, 21) if ckpt.due(s)] == [3, 6, 9, 12, 15, 18, 20]
    counter.value = 5
    ckpt.save(3, {"val/taxa_L10/top1": 0.4})
    counter.value = 6
    ckpt.save(6, {})  # no validation of these weights: not ranked
    state = json.loads((tmp_path / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert state["counter"] == 6 and state["samples_seen"] == 6 * 8 and state["world_size"] == 1
    assert [b["step"] for b in state["best_checkpoints"]] == [3]

    again = Checkpointer(acc, tmp_path / "checkpoints", engine_spec(cfg).checkpoint, plan, zero_stage=0)
    restored = Counter()
    again.register("counter", restored)
    point = again.find_resume()
    assert point is not None and point.exact and point.step == 6 and point.path.name == "step_6"
    assert again.restore(point) == 6
    assert restored.value == 6 and [b["step"] for b in again.bests] == [3] and again.last_saved_step == 6


def test_decide_on_main_returns_the_value_and_reraises_one_line_errors_by_type():
    from linnaeus.engine.distributed import decide_on_main
    from linnaeus.errors import DataError

    class Alone:  # a single process: no broadcast needed
        is_main_process = True
        num_processes = 1

    assert decide_on_main(Alone(), lambda: {"step": 3}) == {"step": 3}

    def refuse() -> None:
        raise DataError("checkpoints/step_3/optimizer.bin: refused")

    with pytest.raises(DataError, match=r"step_3/optimizer\.bin: refused"):
        decide_on_main(Alone(), refuse)


def test_a_backbone_saved_unfrozen_stays_unfrozen_when_the_schedule_is_stretched(monkeypatch):
    from linnaeus.engine import finetune
    from linnaeus.engine.finetune import FreezeState

    unfrozen = []
    monkeypatch.setattr(finetune, "set_backbone_frozen", lambda model, frozen: unfrozen.append(frozen))
    cfg = load_config(None, ["MODEL.FREEZE_BACKBONE", "true", "MODEL.UNFREEZE_BACKBONE_AFTER", "{FRACTION: 0.5}"])
    longer = FreezeState(engine_spec(cfg).freeze, StepPlan(steps_per_epoch=10, total_steps=200))  # unfreezes at 100 now
    model = torch.nn.Linear(2, 2)
    longer.apply(model, 60, {"backbone_frozen": False})  # saved at 60 of 100, after the unfreeze at 50
    assert longer.frozen is False and not longer.due(60) and unfrozen == [False]
    fresh = FreezeState(engine_spec(cfg).freeze, StepPlan(steps_per_epoch=10, total_steps=200))
    fresh.apply(model, 60, None)
    assert fresh.frozen is True and fresh.due(100) and unfrozen == [False]


def test_a_requeued_run_continues_its_own_checkpoints_not_resume_from(tmp_path):
    from linnaeus.engine.checkpointer import resume_candidate

    def checkpoint(root: Path, step: int) -> Path:
        folder = root / f"step_{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
        (root / "latest").write_text(f"step_{step}\n")
        return folder

    start = checkpoint(tmp_path / "old_run" / "checkpoints", 5)
    own_root = tmp_path / "new_run" / "checkpoints"
    cfg = load_config(None, ["TRAIN.RESUME_FROM", str(start)])
    assert resume_candidate(engine_spec(cfg).checkpoint, own_root) == start  # a new folder starts from RESUME_FROM
    own = checkpoint(own_root, 12)
    # after preemption, the job continues its own progress
    assert resume_candidate(engine_spec(cfg).checkpoint, own_root) == own


def test_derived_seeds_follow_the_workers_rule() -> None:
    import numpy as np

    from linnaeus.utils.seeds import rng_of, seed_of

    # The workers' default_rng((seed, epoch, index)) is SeedSequence on the tuple: rng_of is the same generator.
    assert rng_of(42, 3, 7).integers(2**62) == np.random.default_rng((42, 3, 7)).integers(2**62)
    seeds = {seed_of(42, rank, step, micro) for rank in range(2) for step in range(50) for micro in range(3)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)  # distinct, and valid for torch.Generator
    assert seed_of(42, 0, 5, 1) == seed_of(42, 0, 5, 1) != seed_of(43, 0, 5, 1)


def test_auto_resume_false_never_starts_a_second_run_in_a_folder_with_checkpoints(tmp_path):
    """Issue 26: AUTO_RESUME False into a folder with checkpoints mixed two runs (retention rotated the new run's
    checkpoints away, export and report named different runs). It is refused with one line naming the folder."""
    from linnaeus.engine.checkpointer import resume_candidate

    root = tmp_path / "run" / "checkpoints"
    fresh = engine_spec(load_config(None, ["TRAIN.AUTO_RESUME", "false"])).checkpoint
    assert resume_candidate(fresh, root) is None  # an empty folder starts afresh
    (root / "step_3").mkdir(parents=True)
    (root / "step_3" / "trainer_state.json").write_text(json.dumps({"step": 3}))
    (root / "latest").write_text("step_3\n")
    with pytest.raises(ConfigError) as err:
        resume_candidate(fresh, root)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "run") in msg and "step_3" in msg
    assert "EXPERIMENT.NAME" in msg and "delete" in msg and "TRAIN.AUTO_RESUME True" in msg
