"""The checkpointer: where a run resumes, restoring it (also onto another process count or ZeRO stage), saving with
metric bests, and the final export. File layout and retention are ``CheckpointManager``'s (checkpoint.py)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from linnaeus.engine.checkpoint import (
    CheckpointManager,
    consolidated_state_dict,
    export_weights,
    read_state,
    step_dir_name,
)
from linnaeus.engine.config_change import schedule_change_line
from linnaeus.engine.distributed import decide_on_main
from linnaeus.engine.ema import EMA_FILE
from linnaeus.engine.schedule import StepPlan, fires, interval_steps
from linnaeus.errors import ConfigError
from linnaeus.specs.engine import CheckpointSpec
from linnaeus.utils.io import atomic_save_safetensors

log = logging.getLogger("linnaeus")


class Stateful(Protocol):
    """A component whose small, JSON-able state travels in ``trainer_state.json`` (keys are shared flat, so each
    component uses its own names)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Recorded(Protocol):
    """A component whose state is written with every checkpoint for the record only: it reads the saved value from
    the resume point itself (``ResumePoint.saved``), so nothing is handed back on restore."""

    def state_dict(self) -> dict[str, Any]: ...


class FileState(Protocol):
    """A component whose state is a file in the checkpoint folder (the same on every rank, e.g. the EMA weights)."""

    def save(self, path: str | os.PathLike) -> Any: ...

    def load(self, path: str | os.PathLike) -> None: ...


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    saved: dict[str, Any]  # trainer_state.json, as the main process read it
    step: int  # the optimizer step of this run's plan to continue from
    exact: bool  # same process count, ZeRO stage and trainable parameters: optimizer and RNG are restored too
    relayout: str | None = None  # set when a same-layout checkpoint still cannot restore its optimizer: why


def resume_step(saved: dict[str, Any], plan: StepPlan, zero_stage: int) -> tuple[int, bool]:
    """(step to continue from, exact?) for a checkpoint's state. Optimizer shards are tied to the process count and
    ZeRO stage, weights are not: with another layout, progress is mapped by samples consumed, so epochs, the LR
    schedule and the ramps continue at the same point of the data."""
    if saved.get("world_size") == plan.world_size and saved.get("zero_stage") == zero_stage:
        return int(saved["step"]), True
    return plan.step_for_samples(int(saved["samples_seen"])), False


def checkpoint_manager(spec: CheckpointSpec, root: Path) -> CheckpointManager:
    return CheckpointManager(
        root, keep_last=spec.keep_last, keep_best=spec.keep_best, best_metric=spec.best_metric, best_mode=spec.best_mode
    )


def resume_candidate(spec: CheckpointSpec, root: Path) -> Path | None:
    """The checkpoint this run continues from. With TRAIN.AUTO_RESUME (the default), the run folder's own latest
    checkpoint when it has one, so a preempted and requeued job continues its own progress; otherwise
    TRAIN.RESUME_FROM (where a new run starts from), else nothing. Reads files, so only the main process calls it
    and shares the answer."""
    own = checkpoint_manager(spec, root).latest() if spec.auto_resume else None
    if own is not None:
        return own
    if spec.resume_from:
        path = Path(spec.resume_from)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"TRAIN.RESUME_FROM: {path} is not a complete checkpoint folder (no trainer_state.json)")
        return path
    return None


class Checkpointer:
    """Every method that saves or restores is collective (each process calls it at the same step)."""

    def __init__(self, accelerator: Any, root: Path, spec: CheckpointSpec, plan: StepPlan, zero_stage: int) -> None:
        self.accelerator = accelerator
        self.manager = checkpoint_manager(spec, root)
        self.spec = spec
        self.plan = plan
        self.zero_stage = zero_stage
        self.every = interval_steps(spec.every, plan)
        self.components: dict[str, Stateful] = {}
        self.records: dict[str, Recorded] = {}
        self.files: dict[str, FileState] = {}
        self.bests: list[dict[str, Any]] = []
        self.last_saved_step = -1
        self.save_seconds = 0.0  # wall time spent saving and exporting (for the end-of-run report)
        self.export_seconds = 0.0

    def register(self, name: str, component: Stateful) -> None:
        """Save ``component.state_dict()`` with every checkpoint and hand the saved state back on resume."""
        self.components[name] = component

    def register_record(self, name: str, component: Recorded) -> None:
        """Save ``component.state_dict()`` with every checkpoint; nothing is restored (see ``Recorded``)."""
        self.records[name] = component

    def register_file(self, filename: str, component: FileState) -> None:
        """Save ``component`` as ``<checkpoint>/<filename>`` (main process) and load it from there on resume."""
        self.files[filename] = component

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

        def decide() -> tuple[str, dict[str, Any]] | None:
            path = resume_candidate(self.spec, self.manager.root)
            asked = self.spec.resume_from
            if path is not None and asked and Path(asked).resolve() != path.resolve():
                log.warning(
                    "TRAIN.RESUME_FROM %s: this run folder has checkpoints of its own; continuing from %s "
                    "(TRAIN.AUTO_RESUME False starts from RESUME_FROM instead)",
                    asked,
                    path,
                )
            return None if path is None else (str(path), read_state(path))

        found = decide_on_main(self.accelerator, decide)
        if found is None:
            return None
        path, saved = Path(found[0]), found[1]
        step, exact = resume_step(saved, self.plan, self.zero_stage)
        return ResumePoint(path=path, saved=saved, step=step, exact=exact)

    def finished_step(self, export_dir: Path) -> int | None:
        """The step of a run that has nothing left to do, or None: the checkpoint a resume would continue from is at
        (or past) the plan's last step and ``export_dir/final.safetensors`` holds that step's weights. Decided on the
        main process and broadcast (it decides whether any collective runs)."""

        def decide() -> int | None:
            path = resume_candidate(self.spec, self.manager.root)
            final = export_dir / "final.safetensors"
            if path is None or not final.is_file():
                return None
            saved = read_state(path)
            step, _ = resume_step(saved, self.plan, self.zero_stage)
            done = step >= self.plan.total_steps and _exported_step(final) == str(saved["step"])
            return step if done else None

        return decide_on_main(self.accelerator, decide)

    def point_at(self, step: int) -> ResumePoint:
        """The checkpoint this run just saved at ``step``, as a resume point (collective, like ``find_resume``)."""
        path = self.manager.root / step_dir_name(step)
        saved = decide_on_main(self.accelerator, lambda: read_state(path))
        return ResumePoint(path=path, saved=saved, step=step, exact=True)

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
        elif point.relayout is not None:
            log.info(
                "continuing from step %d (%s) with another %s: weights restored, optimizer state restarted",
                point.step,
                point.path,
                point.relayout,
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
        for filename, component in self.files.items():
            component.load(point.path / filename)
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
            "best_metric": self.manager.best_metric,
        }
        for component in [*self.components.values(), *self.records.values()]:
            state |= component.state_dict()
        path = self.manager.save(self.accelerator, step, state, self._write_files)
        self.last_saved_step = step
        log.info("checkpoint saved: %s", path)
        self.save_seconds += time.perf_counter() - start
        return path

    def _write_files(self, folder: Path) -> None:
        for filename, component in self.files.items():
            component.save(folder / filename)

    def export(self, out_dir: Path, step: int) -> None:
        """Consolidated fp32 weights of the final and best checkpoints, and the final EMA weights as
        ``ema.safetensors`` (main process; reads files only). Ranked by a ``val_ema/`` metric, ``best`` is the best
        checkpoint's EMA weights: the weights that metric measured."""
        if not self.accelerator.is_main_process:
            return
        start = time.perf_counter()
        latest = self.manager.latest()
        meta = {"model": self.spec.model_name, "step": str(step)}
        if latest is not None:
            export_weights(latest, out_dir / "final.safetensors", meta)
            if (latest / EMA_FILE).is_file():
                copy_weights(latest / EMA_FILE, out_dir / EMA_FILE, {**meta, "weights": "ema"})
        best = self.bests[0] if self.bests else None
        if best and (self.manager.root / best["dir"]).is_dir():
            best_dir, best_meta = self.manager.root / best["dir"], {**meta, "step": str(best["step"])}
            if ranks_ema(self.manager.best_metric):
                copy_weights(best_dir / EMA_FILE, out_dir / "best.safetensors", {**best_meta, "weights": "ema"})
            else:
                export_weights(best_dir, out_dir / "best.safetensors", best_meta)
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


EMA_PHASE = "val_ema"


def ranks_ema(best_metric: str) -> bool:
    """Is ``best`` chosen by a metric of the EMA weights (``val_ema/...``)?"""
    return best_metric.startswith(f"{EMA_PHASE}/")


def copy_weights(src: Path, dst: Path, metadata: dict[str, str]) -> Path:
    """A safetensors file rewritten with ``metadata`` (temp + rename; readable by the group, like any export)."""
    from safetensors.torch import load_file

    return atomic_save_safetensors(load_file(str(src)), dst, metadata)
