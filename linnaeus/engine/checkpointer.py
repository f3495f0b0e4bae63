"""The checkpointer: where a run resumes, restoring it (also onto another process count or ZeRO stage), saving with
metric bests, and the final export. File layout and retention are ``CheckpointManager``'s (checkpoint.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from linnaeus.config import Config
from linnaeus.engine.checkpoint import CheckpointManager, consolidated_state_dict, export_weights, read_state
from linnaeus.engine.config_change import schedule_change_line
from linnaeus.engine.schedule import StepPlan, fires, interval_steps
from linnaeus.errors import ConfigError

log = logging.getLogger("linnaeus")


class Stateful(Protocol):
    """A component whose small, JSON-able state travels in ``trainer_state.json`` (keys are shared flat, so each
    component uses its own names)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    saved: dict[str, Any]  # trainer_state.json, as the main process read it
    step: int  # the optimizer step of this run's plan to continue from
    exact: bool  # same process count and ZeRO stage: optimizer, RNG and data position are restored too


def resume_step(saved: dict[str, Any], plan: StepPlan, zero_stage: int) -> tuple[int, bool]:
    """(step to continue from, exact?) for a checkpoint's state. Optimizer shards are tied to the process count and
    ZeRO stage, weights are not: with another layout, progress is mapped by samples consumed, so epochs, the LR
    schedule and the ramps continue at the same point of the data."""
    if saved.get("world_size") == plan.world_size and saved.get("zero_stage") == zero_stage:
        return int(saved["step"]), True
    return plan.step_for_samples(int(saved["samples_seen"])), False


def checkpoint_manager(cfg: Config, root: Path) -> CheckpointManager:
    c = cfg.SCHEDULE.CHECKPOINT
    return CheckpointManager(
        root, keep_last=c.KEEP_LAST_N, keep_best=c.KEEP_BEST_N, best_metric=c.BEST_METRIC, best_mode=c.BEST_MODE
    )


def resume_candidate(cfg: Config, root: Path) -> Path | None:
    """The checkpoint this run continues from: TRAIN.RESUME_FROM, else the folder's latest when auto-resuming. Reads
    files, so only the main process calls it and shares the answer."""
    t = cfg.TRAIN
    if t.RESUME_FROM:
        path = Path(t.RESUME_FROM)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"TRAIN.RESUME_FROM: {path} is not a complete checkpoint folder (no trainer_state.json)")
        return path
    return checkpoint_manager(cfg, root).latest() if t.AUTO_RESUME else None


class Checkpointer:
    """Every method that saves or restores is collective (each process calls it at the same step)."""

    def __init__(self, accelerator: Any, root: Path, cfg: Config, plan: StepPlan, zero_stage: int) -> None:
        c = cfg.SCHEDULE.CHECKPOINT
        self.accelerator = accelerator
        self.manager = checkpoint_manager(cfg, root)
        self.cfg = cfg
        self.plan = plan
        self.zero_stage = zero_stage
        self.every = interval_steps(c.INTERVAL, plan)
        self.components: dict[str, Stateful] = {}
        self.bests: list[dict[str, Any]] = []
        self.last_saved_step = -1
        self.save_seconds = 0.0  # wall time spent saving and exporting (for the end-of-run report)
        self.export_seconds = 0.0

    def register(self, name: str, component: Stateful) -> None:
        """Save ``component.state_dict()`` with every checkpoint and hand the saved state back on resume."""
        self.components[name] = component

    def due(self, step: int) -> bool:
        return fires(self.every, step, self.plan)

    # ------------------------------------------------------------------------------------------------ resume
    def prepare_folder(self) -> None:
        if self.accelerator.is_main_process:
            self.manager.root.mkdir(parents=True, exist_ok=True)
            self.manager.clean_partial()
        self.accelerator.wait_for_everyone()

    def find_resume(self) -> ResumePoint | None:
        """Decided on the main process and broadcast: ranks reading a shared filesystem at slightly different moments
        (or through stale NFS caches) must never choose different checkpoints or read different states."""
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [None]
        if self.accelerator.is_main_process:
            path = resume_candidate(self.cfg, self.manager.root)
            box = [None if path is None else (str(path), read_state(path))]
        broadcast_object_list(box, from_process=0)
        if box[0] is None:
            return None
        path, saved = Path(box[0][0]), box[0][1]
        step, exact = resume_step(saved, self.plan, self.zero_stage)
        return ResumePoint(path=path, saved=saved, step=step, exact=exact)

    def finished_step(self, export_dir: Path) -> int | None:
        """The step of a run that has nothing left to do, or None: the checkpoint a resume would continue from is at
        (or past) the plan's last step and ``export_dir/final.safetensors`` holds that step's weights. Decided on the
        main process and broadcast (it decides whether any collective runs)."""
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [None]
        if self.accelerator.is_main_process:
            path = resume_candidate(self.cfg, self.manager.root)
            final = export_dir / "final.safetensors"
            if path is not None and final.is_file():
                saved = read_state(path)
                step, _ = resume_step(saved, self.plan, self.zero_stage)
                if step >= self.plan.total_steps and _exported_step(final) == str(saved["step"]):
                    box = [step]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def load_weights(self, model: nn.Module, point: ResumePoint) -> None:
        """Before ``accelerator.prepare``, for a resume onto another layout: the consolidated fp32 weights."""
        missing, unexpected = model.load_state_dict(consolidated_state_dict(point.path), strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"TRAIN.RESUME_FROM: {point.path} does not match this model "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )

    def restore(self, point: ResumePoint) -> int:
        """After ``accelerator.prepare``: the full state on an exact resume (weights, optimizer, RNG), and every
        registered component's state. Returns the step to continue from."""
        saved = point.saved
        if point.exact:
            self.accelerator.load_state(str(point.path))
            log.info(
                "resumed from step %d (%s): weights, optimizer, RNG, schedules and data position",
                point.step,
                point.path,
            )
        else:
            log.warning(
                "resumed from step %d of %s with a different process count or ZeRO stage (%d/ZeRO-%d -> %d/ZeRO-%d): "
                "model weights restored and progress mapped by samples consumed (%d samples -> step %d); metric "
                "bests and GradNorm weights restored; optimizer state and RNG restarted",
                saved["step"],
                point.path,
                saved.get("world_size", 0),
                saved.get("zero_stage", 0),
                self.plan.world_size,
                self.zero_stage,
                saved["samples_seen"],
                point.step,
            )
        stretched = schedule_change_line(saved.get("total_steps"), self.plan.total_steps)
        if stretched:
            log.info("%s", stretched)
        self.bests = list(saved.get("best_checkpoints", []))
        for component in self.components.values():
            component.load_state_dict(saved)
        self.last_saved_step = point.step
        return point.step

    # ------------------------------------------------------------------------------------------------ saving
    def save(self, step: int, val_metrics: dict[str, float]) -> Path:
        """Collective. ``val_metrics``: a validation of exactly this step's weights (empty if none), which alone
        may rank this checkpoint among the bests."""
        start = time.perf_counter()
        if self.manager.best_metric in val_metrics:
            self.bests = self.manager.update_bests(self.bests, step, val_metrics)
        state: dict[str, Any] = {
            "step": step,
            "epoch": self.plan.epoch_of(step),
            "samples_seen": step * self.plan.global_batch,
            # The plan's length when saved: a resume with more epochs can say that the schedule was stretched.
            "total_steps": self.plan.total_steps,
            "world_size": self.plan.world_size,
            "zero_stage": self.zero_stage,
            "best_checkpoints": self.bests,
        }
        for component in self.components.values():
            state |= component.state_dict()
        path = self.manager.save(self.accelerator, step, state)
        self.last_saved_step = step
        log.info("checkpoint saved: %s", path)
        self.save_seconds += time.perf_counter() - start
        return path

    def export(self, out_dir: Path, step: int) -> None:
        """Consolidated fp32 weights of the final and best checkpoints (main process; reads files only)."""
        if not self.accelerator.is_main_process:
            return
        start = time.perf_counter()
        latest = self.manager.latest()
        meta = {"model": self.cfg.MODEL.NAME, "step": str(step)}
        if latest is not None:
            export_weights(latest, out_dir / "final.safetensors", meta)
        best = self.bests[0] if self.bests else None
        if best and (self.manager.root / best["dir"]).is_dir():
            export_weights(
                self.manager.root / best["dir"], out_dir / "best.safetensors", {**meta, "step": str(best["step"])}
            )
        log.info("exported weights to %s", out_dir)
        self.export_seconds += time.perf_counter() - start


def _exported_step(path: Path) -> str | None:
    """The ``step`` recorded in an exported safetensors file's metadata (header only; no tensors read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("step")
    except (OSError, SafetensorError):  # a torn or foreign file: not a finished export; the run exports again
        return None
