"""Where logged metrics go: ``metrics.jsonl`` always (main process), W&B through accelerate's trackers when enabled."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from linnaeus.config import Config
from linnaeus.engine.run_dir import MetricsWriter
from linnaeus.engine.schedule import StepPlan


class Tracking:
    def __init__(self, accelerator: Any, cfg: Config, run: Path, plan: StepPlan) -> None:
        self.accelerator = accelerator
        self.cfg = cfg
        self.run = run
        self.plan = plan
        self.writer = MetricsWriter(run / "metrics.jsonl", enabled=accelerator.is_main_process)
        self.wandb = cfg.EXPERIMENT.WANDB.ENABLED
        self.wandb_run_id: str | None = None

    def start(self) -> None:
        """Open the W&B run (after a resume has restored its id, so a resumed run reattaches to the same one)."""
        if not self.wandb:
            return
        cfg, w = self.cfg, self.cfg.EXPERIMENT.WANDB
        if w.MODE:
            os.environ["WANDB_MODE"] = w.MODE
        if self.wandb_run_id is None:
            self.wandb_run_id = w.RUN_ID or uuid.uuid4().hex[:12]
        init = {
            "name": cfg.EXPERIMENT.NAME,
            "group": cfg.EXPERIMENT.GROUP,
            "tags": list(cfg.EXPERIMENT.TAGS) + list(w.TAGS),
            "notes": cfg.EXPERIMENT.NOTES,
            "entity": w.ENTITY,
            "id": self.wandb_run_id,
            "resume": "allow",
            "dir": str(self.run),
        }
        from linnaeus.config import config_to_dict

        self.accelerator.init_trackers(
            w.PROJECT or cfg.EXPERIMENT.PROJECT, config=config_to_dict(cfg), init_kwargs={"wandb": init}
        )

    def log(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        epoch = self.plan.epoch_of(step)
        self.writer.write(step, epoch, phase, metrics)
        if self.wandb:
            self.accelerator.log({f"{phase}/{k}": v for k, v in metrics.items()} | {"epoch": epoch}, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wandb_run_id = state.get("wandb_run_id")
