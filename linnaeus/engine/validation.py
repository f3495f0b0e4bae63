"""Validation during training: when it is due, one pass over the validation set per model, exact global metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from linnaeus.engine.metrics import ValidationMeter
from linnaeus.engine.report import format_table_with_history, update_bests
from linnaeus.engine.schedule import StepPlan, fires, interval_steps
from linnaeus.specs.engine import ValidationSpec

log = logging.getLogger("linnaeus")

TITLES = {"val": "validation", "val_mask_meta": "validation, metadata masked", "val_ema": "validation, EMA weights"}
Reduce = Callable[[torch.Tensor], torch.Tensor]
LogFn = Callable[[str, dict[str, float]], None]


class Validator:
    """Runs ``val`` every ``spec.every`` and ``val_mask_meta`` (every metadata component zeroed) every
    ``spec.mask_meta_every`` (both resolved against ``plan`` to ``every`` / ``masked_every`` steps), and remembers the last ``val`` metrics with their step, so a checkpoint is ranked only by
    a validation of exactly its weights.

    Per phase it keeps the previous evaluation and the best value so far of every metric, so each table shows the
    change and the best; both travel in checkpoints (``state_dict``), so they survive a resume. ``seconds`` is the
    wall time spent validating (for the end-of-run report). With ``ema`` set (an eval-mode module, e.g.
    ``EmaComponent.module``), every ``val`` pass also runs it as the phase ``val_ema`` on the same batches."""

    def __init__(
        self,
        loader: Iterable[dict[str, Any]],
        sampler: Any,
        task_keys: list[str],
        spec: ValidationSpec,
        *,
        device: torch.device,
        dtype: torch.dtype,
        plan: StepPlan,
        reduce_sum: Reduce | None = None,
        decode: Callable[[dict[str, Any], torch.device], dict[str, Any]] | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.loader, self.sampler = loader, sampler
        self.decode = decode  # DATA.DECODE device: turns encoded batches into images on the device
        self.task_keys = list(task_keys)
        self.mean, self.std = spec.mean, spec.std
        self.device, self.dtype = device, dtype
        self.memory_format = memory_format  # the training step's image layout (MODEL.CHANNELS_LAST)
        self.plan = plan
        self.every = interval_steps(spec.every, plan)
        self.masked_every = interval_steps(spec.mask_meta_every, plan)
        self.reduce_sum = reduce_sum
        self.last: dict[str, float] = {}  # flat "val/<key>" metrics of the last normal validation
        self.last_step = -1
        self.previous: dict[str, dict[str, float]] = {}  # phase -> metrics of its last evaluation
        self.bests: dict[str, dict[str, float]] = {}  # phase -> best value so far per metric
        self.seconds = 0.0
        self.ema: nn.Module | None = None

    def metrics_at(self, step: int) -> dict[str, float]:
        """The last validation's metrics if it validated exactly the weights of ``step``, else empty."""
        return self.last if self.last_step == step else {}

    def due(self, step: int) -> bool:
        return fires(self.every, step, self.plan) or fires(self.masked_every, step, self.plan)

    def maybe_run(self, step: int, model: nn.Module, log_metrics: LogFn) -> None:
        """Validate ``model`` after optimizer step ``step`` if due; every process calls this (collective)."""
        if not self.due(step):
            return
        normal = fires(self.every, step, self.plan)
        masked = fires(self.masked_every, step, self.plan)
        normal = normal or not self.last  # the masked pass alone never leaves the run without a normal one
        phases = {name: mask for name, mask, on in (("val", False, normal), ("val_mask_meta", True, masked)) if on}
        if normal and self.ema is not None:
            phases["val_ema"] = False
        start = time.perf_counter()
        results = self.evaluate(model, phases, {"val_ema": self.ema} if self.ema is not None else None)
        self.seconds += time.perf_counter() - start
        for phase, metrics in results.items():
            log_metrics(phase, metrics)
            previous, best = self.previous.get(phase), self.bests.get(phase, {})
            log.info(format_table_with_history(TITLES.get(phase, phase), step, metrics, self.task_keys, previous, best))
            self.previous[phase] = dict(metrics)
            self.bests[phase] = update_bests(best, metrics)
        if normal:
            self.last = {f"val/{k}": v for k, v in results["val"].items()}
            for phase in ("val_mask_meta", "val_ema"):
                self.last |= {f"{phase}/{k}": v for k, v in results.get(phase, {}).items()}
            self.last_step = step

    def state_dict(self) -> dict[str, Any]:
        return {"validation_previous": self.previous, "validation_bests": self.bests}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = {p: dict(m) for p, m in (state.get("validation_previous") or {}).items()}
        self.bests = {p: dict(m) for p, m in (state.get("validation_bests") or {}).items()}

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, phases: dict[str, bool], others: dict[str, nn.Module] | None = None
    ) -> dict[str, dict[str, float]]:
        """One pass over the validation set: each batch is decoded and moved once, then run once per phase
        (phase name -> whether every metadata component is masked). ``others``: phases that run another module
        (already in eval mode, in its own parameters' dtype) instead of ``model``. Collective."""
        from accelerate.utils import send_to_device

        from linnaeus.aug import eval_transform

        was_training = model.training
        model.eval()
        meters = {name: ValidationMeter(self.task_keys, self.device) for name in phases}
        runs = {name: (others or {}).get(name, model) for name in phases}
        dtypes = {name: self.dtype if m is model else next(m.parameters()).dtype for name, m in runs.items()}
        self.sampler.set_epoch(0)
        for batch in self.loader:
            if self.decode is not None:
                batch = self.decode(batch, self.device)
            batch = send_to_device(batch, self.device, non_blocking=True)
            view_mask = batch.get("view_mask")  # observations: (B, K) views, folded into the batch for the model
            views = {} if view_mask is None else {"view_mask": view_mask}
            images = eval_transform(batch["image"].flatten(0, 1) if views else batch["image"], self.mean, self.std)
            meta = batch["meta"]
            for name, masked in phases.items():
                dtype = dtypes[name]
                meta_in = None if meta.shape[1] == 0 else (torch.zeros_like(meta) if masked else meta).to(dtype)
                meters[name].update(
                    runs[name](images.to(dtype, memory_format=self.memory_format), meta_in, **views),
                    batch["targets"],
                    batch["is_pad"],
                )
        model.train(was_training)
        return {name: m.compute(self.reduce_sum) for name, m in meters.items()}
