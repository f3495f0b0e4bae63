"""Where logged metrics go: ``metrics.jsonl`` always (main process), and the trackers of ``EXPERIMENT.TRACKERS``
(wandb, tensorboard, csv; ``EXPERIMENT.WANDB.ENABLED`` adds wandb) through accelerate when any is on."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from linnaeus.engine.run_dir import MetricsWriter
from linnaeus.engine.schedule import StepPlan
from linnaeus.engine.trackers import plan_trackers
from linnaeus.specs.engine import TrackingSpec


class Tracking:
    def __init__(self, accelerator: Any, spec: TrackingSpec, run: Path, plan: StepPlan) -> None:
        self.accelerator = accelerator
        self.spec = spec
        self.run = run
        self.plan = plan
        self.writer = MetricsWriter(run / "metrics.jsonl", enabled=accelerator.is_main_process)
        self.trackers = plan_trackers(spec, run)
        self.wandb = "wandb" in self.trackers.names
        self.wandb_run_id: str | None = None
        self.started = False

    def start(self, config: Mapping[str, Any]) -> None:
        """Open the trackers (after a resume has restored the W&B run id, so a resumed run reattaches to its run);
        ``config``: the whole config as a dict, recorded as the trackers' hyperparameters."""
        if not self.trackers.enabled:
            return
        if self.wandb and self.wandb_run_id is None:
            self.wandb_run_id = self.spec.wandb_run_id or uuid.uuid4().hex[:12]
        self.trackers = plan_trackers(self.spec, self.run, self.wandb_run_id)
        self.accelerator.init_trackers(**self.trackers.init_kwargs(config))
        self.started = True

    def log(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        epoch = self.plan.epoch_of(step)
        self.writer.write(step, epoch, phase, metrics)
        if self.started:
            self.accelerator.log({f"{phase}/{k}": v for k, v in metrics.items()} | {"epoch": epoch}, step=step)

    def summarize(self, values: dict[str, Any]) -> None:
        """The end-of-run numbers as the W&B run's summary (main process; no-op without W&B)."""
        if not (self.started and self.wandb and self.accelerator.is_main_process):
            return
        run = self.accelerator.get_tracker("wandb", unwrap=True)
        run.summary.update({k: v for k, v in values.items() if v is not None})

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wandb_run_id = state.get("wandb_run_id")
