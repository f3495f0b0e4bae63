"""The training job: one Accelerator, one nn.Module, one optimizer, a step-based loop with epochs as a view.

Components live in their own modules (schedule, metrics, checkpoint, run_dir, distributed); this file wires them.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linnaeus.config import Config, save_config
from linnaeus.engine.checkpoint import CheckpointManager, consolidated_state_dict, export_weights, read_state
from linnaeus.engine.distributed import build_accelerator, prepare_environment
from linnaeus.engine.metrics import ValidationMeter, format_table
from linnaeus.engine.run_dir import MetricsWriter, RunLock, run_path, setup_logging
from linnaeus.engine.schedule import LRSchedule, OpsSchedule, StepPlan, fires, plan_steps
from linnaeus.errors import ConfigError, LinnaeusError

log = logging.getLogger("linnaeus")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; SLURM scripts can requeue on it.
PREEMPT_CHECK_STEPS = 5


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed on every rank
    samples_seen: int = 0  # training samples consumed over all processes: maps progress across world sizes
    best_checkpoints: list[dict[str, Any]] = field(default_factory=list)
    wandb_run_id: str | None = None
    world_size: int = 1
    zero_stage: int = 0
    missing_images: int = 0
    task_weights: dict[str, float] = field(default_factory=dict)
    gradnorm_state: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerState:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class PreemptionFlag:
    """SIGTERM/SIGINT set a flag; the loop checks it (agreed across ranks) after each optimizer step."""

    def __init__(self) -> None:
        self.raised = False
        self.signal_name = ""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.raised = True
        self.signal_name = signal.Signals(signum).name


def _seed_everything(seed: int, deterministic: bool = False) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # warn_only: a few kernels have no deterministic variant; say so instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = {kk: vv.to(device, non_blocking=True) for kk, vv in v.items()}
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        else:
            out[k] = v
    return out


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run = run_path(cfg)

    # -------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        prepare_environment()
        self.accelerator, self.dist = build_accelerator(cfg, cfg.DATA.BATCH_SIZE)
        acc = self.accelerator
        self.is_main = acc.is_main_process
        if self.is_main:
            self.run.mkdir(parents=True, exist_ok=True)
            RunLock.acquire(self.run)  # refuses a folder another run is using; released at exit
        acc.wait_for_everyone()
        setup_logging(self.run, acc.process_index, self.is_main, cfg.EXPERIMENT.LOG_LEVEL)
        self.metrics_out = MetricsWriter(self.run / "metrics.jsonl", enabled=self.is_main)
        self.ckpt = CheckpointManager(
            self.run / "checkpoints",
            keep_last=cfg.SCHEDULE.CHECKPOINT.KEEP_LAST_N,
            keep_best=cfg.SCHEDULE.CHECKPOINT.KEEP_BEST_N,
            best_metric=cfg.SCHEDULE.CHECKPOINT.BEST_METRIC,
            best_mode=cfg.SCHEDULE.CHECKPOINT.BEST_MODE,
        )
        if self.is_main:
            self.ckpt.root.mkdir(parents=True, exist_ok=True)
            self.ckpt.clean_partial()
        acc.wait_for_everyone()
        _seed_everything(cfg.MISC.SEED, cfg.MISC.DETERMINISTIC)
        if not torch.cuda.is_available():
            # Near-zero values (LayerScale starts at 1e-6) become denormals in CPU kernels, which run ~4x slower.
            torch.set_flush_denormal(True)

        from linnaeus.data.prepare import prepare_data

        # A resumed run reads the split it saved (a changed labels file is then an error, not a silent new split);
        # image verification runs on the main process (on every process when its limits leave rows out).
        self.data = prepare_data(cfg, split_file=self.run / "split.npz", check_images=self.is_main)
        self.task_keys = list(self.data.task_keys)
        if self.is_main:
            save_config(cfg, self.run / "config.yaml")
            log.info("config: %s; BASE files: %s", self.run / "config.yaml", ", ".join(cfg.BASE_RESOLVED) or "none")
            self.data.save(self.run)
        self._build_loaders()
        self._build_model_and_optimizer()

    def _build_loaders(self) -> None:
        from linnaeus.data.loader import build_loader
        from linnaeus.data.stream import build_train_batches

        cfg, d = self.cfg, self.dist
        self.train_set = self.data.dataset("train", train=True)
        self.val_set = self.data.dataset("val", train=False)
        if len(self.train_set) < d.world_size * cfg.DATA.BATCH_SIZE:
            raise ConfigError(
                f"DATA.BATCH_SIZE: {len(self.train_set)} training samples cannot fill one batch of "
                f"{cfg.DATA.BATCH_SIZE} on each of {d.world_size} processes"
            )
        common = dict(
            num_workers=cfg.DATA.NUM_WORKERS,
            seed=cfg.MISC.SEED,
            num_replicas=d.world_size,
            rank=d.rank,
            pin_memory=cfg.DATA.PIN_MEMORY and torch.cuda.is_available(),
            prefetch_factor=cfg.DATA.PREFETCH_FACTOR,
        )
        # Shards: a plain per-rank loader (never dispatched through rank 0 by accelerate); resampled epochs with a
        # fixed number of batches per rank. Validation stays on files so its metrics are exact.
        self.train_batches = build_train_batches(
            cfg, self.data, world_size=d.world_size, rank=d.rank, pin_memory=common["pin_memory"]
        )
        self.val_loader, self.val_sampler = build_loader(
            self.val_set, batch_size=cfg.DATA.BATCH_SIZE_VAL, shuffle=False, drop_last=False, pad=True, **common
        )
        self.accum = max(1, cfg.TRAIN.ACCUMULATION_STEPS)
        if self.train_batches.batches_per_epoch < self.accum:
            raise ConfigError(
                f"TRAIN.ACCUMULATION_STEPS: {self.accum} micro-batches per optimizer step, but an epoch has only "
                f"{self.train_batches.batches_per_epoch} batches of {cfg.DATA.BATCH_SIZE} per process; lower one of them"
            )
        self.plan: StepPlan = plan_steps(cfg, self.train_batches.batches_per_epoch)
        # Whole accumulation windows only, so every optimizer step sees `accum` micro-batches on every rank.
        self.batches_per_epoch = self.plan.steps_per_epoch * self.accum

    def _build_model_and_optimizer(self) -> None:
        from linnaeus.aug import BatchAugment
        from linnaeus.losses import build_task_loss
        from linnaeus.models import build_model, param_groups

        cfg = self.cfg
        hierarchy = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in self.data.hierarchy_matrices().items()}
        self.model = build_model(cfg.MODEL, self.task_keys, self.data.num_classes, self.data.meta_dims, hierarchy)
        needs_distance = any(
            h.LOSS.TYPE == "TaxonomyAwareLabelSmoothing" for h in cfg.MODEL.CLASSIFICATION.HEADS.values()
        )
        self.loss_fn = build_task_loss(
            cfg,
            self.task_keys,
            self.data.num_classes,
            self.data.distance_matrices() if needs_distance else None,
            self.data.class_counts("train"),
        )
        base_lr = cfg.LR_SCHEDULER.BASE_LR
        if cfg.LR_SCHEDULER.SCALE_WITH_BATCH:
            effective = cfg.DATA.BATCH_SIZE * self.accum * self.dist.world_size
            base_lr = base_lr * effective / cfg.LR_SCHEDULER.REFERENCE_BS
        self.base_lr = base_lr
        groups = [
            g
            for g in param_groups(self.model, cfg.OPTIMIZER.WEIGHT_DECAY, cfg.OPTIMIZER.HEAD_LR_MULTIPLIER)
            if g["params"]
        ]
        for g in groups:
            g["lr"] = base_lr * g.get("lr_scale", 1.0)
        b1, b2 = cfg.OPTIMIZER.BETAS
        self.optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=(b1, b2), eps=cfg.OPTIMIZER.EPS)
        self.lr_schedule = LRSchedule(cfg, self.plan, base_lr)
        self.ops = OpsSchedule(cfg, self.plan)
        self.augment = BatchAugment(cfg.AUG, cfg.SCHEDULE.MIX, self.task_keys, self.data.num_classes)
        self.state = TrainerState(world_size=self.dist.world_size, zero_stage=self.dist.zero_stage)
        self.resume_from = self._find_resume()
        self.weights_only_resume = False
        if self.resume_from is not None:
            saved = self._read_state_everywhere(self.resume_from)
            if saved.get("world_size") != self.dist.world_size or saved.get("zero_stage") != self.dist.zero_stage:
                # Optimizer shards are tied to the process count and ZeRO stage; weights are not.
                self.weights_only_resume = True
                sd = consolidated_state_dict(self.resume_from)
                missing, unexpected = self.model.load_state_dict(sd, strict=False)
                if missing or unexpected:
                    raise ConfigError(
                        f"TRAIN.RESUME_FROM: {self.resume_from} does not match this model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
                    )
        if cfg.MODEL.COMPILE:
            # dynamic=False: inductor's dynamic-shape path crashes on this model (a second input shape, e.g. the
            # validation batch, would otherwise switch it on); each new shape compiles once instead.
            self.model = torch.compile(self.model, dynamic=False)
        if cfg.LOSS.GRADNORM.ENABLED and self.dist.zero_stage == 3:
            raise ConfigError(
                "LOSS.GRADNORM.ENABLED: GradNorm needs whole parameters for its per-rank gradient norms, which ZeRO-3 "
                "partitions; use DDP or ZeRO-1/2, or disable GradNorm"
            )
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.shared_params = (
            self.accelerator.unwrap_model(self.model).gradnorm_shared_parameters() if self.loss_fn.gradnorm else []
        )
        self.loss_fn = self.loss_fn.to(self.accelerator.device)
        self.group_lr_scale = [g.get("lr_scale", 1.0) for g in self.optimizer.param_groups]
        if self.resume_from is not None:
            self._restore(self.resume_from)

    def _find_resume(self) -> Path | None:
        """Decided on the main process and broadcast: ranks reading a shared filesystem at slightly different
        moments (or through stale NFS caches) must never choose different resume paths."""
        from accelerate.utils import broadcast_object_list

        choice: list[Any] = [None]
        if self.is_main:
            found = self._resume_candidate()
            choice = [None if found is None else str(found)]
        broadcast_object_list(choice, from_process=0)
        return None if choice[0] is None else Path(choice[0])

    def _resume_candidate(self) -> Path | None:
        cfg = self.cfg
        if cfg.TRAIN.RESUME_FROM:
            path = Path(cfg.TRAIN.RESUME_FROM)
            if not (path / "trainer_state.json").is_file():
                raise ConfigError(
                    f"TRAIN.RESUME_FROM: {path} is not a complete checkpoint folder (no trainer_state.json)"
                )
            return path
        if cfg.TRAIN.AUTO_RESUME:
            return self.ckpt.latest()
        return None

    def _read_state_everywhere(self, ckpt: Path) -> dict[str, Any]:
        """The checkpoint's trainer state as the main process read it (same reason as `_find_resume`)."""
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [read_state(ckpt) if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _restore(self, ckpt: Path) -> None:
        saved = TrainerState.from_dict(self._read_state_everywhere(ckpt))
        if self.weights_only_resume:
            # Progress is carried over as samples consumed, so epochs, the LR schedule and the ramps continue where
            # they were even though a step now holds a different number of samples; optimizer moments and RNG
            # restart.
            global_batch = self.cfg.DATA.BATCH_SIZE * self.accum * self.dist.world_size
            step = saved.samples_seen // global_batch
            self.state.step = step
            self.state.epoch = step // self.plan.steps_per_epoch
            self.state.batch_in_epoch = (step % self.plan.steps_per_epoch) * self.accum
            log.warning(
                "resumed from step %d of %s with a different process count or ZeRO stage (%d/ZeRO-%d -> %d/ZeRO-%d): "
                "model weights restored and progress mapped by samples consumed (%d samples -> step %d); metric "
                "bests and GradNorm weights restored; optimizer state and RNG restarted",
                saved.step,
                ckpt,
                saved.world_size,
                saved.zero_stage,
                self.dist.world_size,
                self.dist.zero_stage,
                saved.samples_seen,
                step,
            )
        else:
            self.accelerator.load_state(str(ckpt))
            self.state.step = saved.step
            self.state.epoch = saved.epoch
            self.state.batch_in_epoch = saved.batch_in_epoch
            log.info(
                "resumed from step %d (%s): weights, optimizer, RNG, schedules and data position", saved.step, ckpt
            )
        if self.state.batch_in_epoch >= self.batches_per_epoch:  # saved exactly at an epoch's end
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
        self.state.samples_seen = self.state.step * self.cfg.DATA.BATCH_SIZE * self.accum * self.dist.world_size
        self.state.best_checkpoints = saved.best_checkpoints
        self.state.wandb_run_id = saved.wandb_run_id
        self.state.missing_images = saved.missing_images
        self.state.task_weights = saved.task_weights
        if self.loss_fn.gradnorm is not None and saved.gradnorm_state:
            gn = self.loss_fn.gradnorm
            current = gn.state_dict()
            gn.load_state_dict({k: torch.as_tensor(v, dtype=current[k].dtype) for k, v in saved.gradnorm_state.items()})

    # -------------------------------------------------------------------------------------------------- summary
    def _summary(self) -> None:
        cfg, d = self.cfg, self.dist
        per_dev = cfg.DATA.BATCH_SIZE
        rows = [
            ("run folder", str(self.run)),
            ("world size", f"{d.world_size} processes ({d.distributed_type}, {d.num_machines} machine(s))"),
            ("ZeRO stage", str(d.zero_stage) if d.zero_stage else "none"),
            ("precision", f"{d.precision} (from {d.precision_source})"),
            (
                "batch",
                f"{per_dev} per device x {self.accum} accumulation x {d.world_size} = {per_dev * self.accum * d.world_size} effective",
            ),
            ("dataset", f"{len(self.train_set)} train / {len(self.val_set)} val samples"),
            ("classes", ", ".join(f"{k}: {self.data.num_classes[k]}" for k in self.task_keys)),
            (
                "metadata",
                ", ".join(f"{n}({dim})" for n, dim in zip(self.data.meta_components, self.data.meta_dims, strict=True))
                or "none",
            ),
            (
                "model",
                f"{cfg.MODEL.NAME} ({sum(p.numel() for p in self.accelerator.unwrap_model(self.model).parameters()) / 1e6:.2f} M parameters)",
            ),
            ("lr", f"{cfg.LR_SCHEDULER.NAME}, base {self.base_lr:.3g}, warmup {self.lr_schedule.warmup} steps"),
        ]
        rows += self.ops.summary()
        width = max(len(k) for k, _ in rows)
        log.info("Linnaeus training\n%s", "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))

    # -------------------------------------------------------------------------------------------------- W&B
    def _init_trackers(self) -> None:
        cfg = self.cfg
        if not cfg.EXPERIMENT.WANDB.ENABLED:
            return
        w = cfg.EXPERIMENT.WANDB
        if w.MODE:
            import os

            os.environ["WANDB_MODE"] = w.MODE
        if self.state.wandb_run_id is None:
            import uuid

            # Chosen here and saved in the trainer state, so a resumed run reattaches to the same W&B run.
            self.state.wandb_run_id = w.RUN_ID or uuid.uuid4().hex[:12]
        init = {
            "name": cfg.EXPERIMENT.NAME,
            "group": cfg.EXPERIMENT.GROUP,
            "tags": list(cfg.EXPERIMENT.TAGS) + list(w.TAGS),
            "notes": cfg.EXPERIMENT.NOTES,
            "entity": w.ENTITY,
            "id": self.state.wandb_run_id,
            "resume": "allow",
            "dir": str(self.run),
        }
        from linnaeus.config import config_to_dict

        self.accelerator.init_trackers(
            w.PROJECT or cfg.EXPERIMENT.PROJECT, config=config_to_dict(cfg), init_kwargs={"wandb": init}
        )

    def _log(self, phase: str, metrics: dict[str, float]) -> None:
        step, epoch = self.state.step, self.plan.epoch_of(self.state.step)
        self.metrics_out.write(step, epoch, phase, metrics)
        if self.cfg.EXPERIMENT.WANDB.ENABLED:
            self.accelerator.log({f"{phase}/{k}": v for k, v in metrics.items()} | {"epoch": epoch}, step=step)

    # -------------------------------------------------------------------------------------------------- steps
    def _model_dtype(self) -> torch.dtype:
        if self.dist.uses_deepspeed and self.dist.precision in ("bf16", "fp16"):
            return torch.bfloat16 if self.dist.precision == "bf16" else torch.float16
        return torch.float32

    def _mask_meta(
        self, meta: torch.Tensor, meta_valid: torch.Tensor, p_all: float, p_partial: float, gen: torch.Generator
    ):
        """Zero a sample's whole metadata with probability p_all; optionally whitelisted component subsets."""
        if meta.shape[1] == 0:
            return meta, meta_valid
        b = meta.shape[0]
        drop = torch.rand(b, generator=gen, device=meta.device) < p_all
        comp_drop = drop[:, None].expand(-1, meta_valid.shape[1]).clone()
        whitelist = self.cfg.SCHEDULE.META_MASKING.PARTIAL.WHITELIST
        if p_partial > 0 and whitelist:
            names = self.data.meta_components
            pick = torch.randint(len(whitelist), (b,), generator=gen, device=meta.device)
            hit = torch.rand(b, generator=gen, device=meta.device) < p_partial
            for gi, group in enumerate(whitelist):
                cols = [names.index(n) for n in group if n in names]
                if cols:
                    sel = (hit & (pick == gi))[:, None]
                    comp_drop[:, cols] |= sel
        slices = np.cumsum([0, *self.data.meta_dims])
        mask = torch.ones_like(meta)
        for c in range(len(self.data.meta_dims)):
            mask[:, slices[c] : slices[c + 1]] = (~comp_drop[:, c]).to(meta.dtype)[:, None]
        return meta * mask, meta_valid & ~comp_drop

    def _train_step(
        self, batch: dict[str, Any], gen: torch.Generator, first_micro: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        step = self.state.step
        meta, meta_valid = self._mask_meta(
            batch["meta"],
            batch["meta_valid"],
            self.ops.meta_mask_prob(step),
            self.ops.partial_meta_mask_prob(step),
            gen,
        )
        out = self.augment(
            batch["image"], batch["targets"], meta, meta_valid, mix_prob=self.ops.mix_prob(step), generator=gen
        )
        dtype = self._model_dtype()
        meta_in = out.meta.to(dtype) if out.meta.shape[1] else None
        logits = self.model(out.images.to(dtype), meta_in)
        logits = {k: v.float() for k, v in logits.items()}  # losses in fp32
        losses = self.loss_fn.task_losses(logits, out.targets, out.valid, self.ops.null_keep_prob(step), gen)
        gradnorm = self.loss_fn.gradnorm
        if gradnorm is not None and first_micro and gradnorm.due(step):
            # Per-rank gradient norms via autograd.grad: no .grad is touched, no DDP hook fires; averaged over ranks.
            gradnorm.update(losses, self.shared_params, reduce=lambda t: self.accelerator.reduce(t, "mean"))
        total = self.loss_fn.combine(losses)
        self.accelerator.backward(total)
        return total.detach(), {k: v.detach() for k, v in losses.items()}

    def _set_lr(self) -> float:
        lr = self.lr_schedule.lr(self.state.step)
        for g, scale in zip(self.optimizer.param_groups, self.group_lr_scale, strict=False):
            g["lr"] = lr * scale
        return lr

    def _agree(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, "max").item() > 0)

    # -------------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, normal: bool = True, masked: bool = False) -> dict[str, dict[str, float]]:
        """One pass over the validation set: each batch is decoded and moved once, then run with metadata
        (``val``) and/or with every metadata component masked (``val_mask_meta``)."""
        from linnaeus.aug import eval_transform

        self.model.eval()
        device = self.accelerator.device
        passes = [name for name, on in (("val", normal), ("val_mask_meta", masked)) if on]
        meters = {name: ValidationMeter(self.task_keys, device) for name in passes}
        self.val_sampler.set_epoch(0)
        dtype = self._model_dtype()
        for batch in self.val_loader:
            batch = _to_device(batch, device)
            images = eval_transform(batch["image"], self.cfg.AUG.MEAN, self.cfg.AUG.STD).to(dtype)
            meta = batch["meta"]
            for name in passes:
                if meta.shape[1] == 0:
                    meta_in = None
                else:
                    meta_in = (torch.zeros_like(meta) if name == "val_mask_meta" else meta).to(dtype)
                meters[name].update(self.model(images, meta_in), batch["targets"], batch["is_pad"])
        self.model.train()
        return {name: m.compute(lambda t: self.accelerator.reduce(t, "sum")) for name, m in meters.items()}

    def _run_validation(self, with_masked: bool, do_normal: bool = True) -> None:
        results = self.validate(normal=do_normal, masked=with_masked)
        titles = {"val": "validation", "val_mask_meta": "validation, metadata masked"}
        if do_normal:
            self.last_val = {}
        for phase, metrics in results.items():
            self._log(phase, metrics)
            log.info(format_table(titles[phase], self.state.step, metrics, self.task_keys))
            self.last_val.update({f"{phase}/{k}": v for k, v in metrics.items()})
        if do_normal:
            self.last_val_step = self.state.step

    # -------------------------------------------------------------------------------------------------- checkpoint
    def _save(self) -> Path:
        s = self.state
        s.task_weights = {k: float(w) for k, w in zip(self.task_keys, self.loss_fn.task_weights.tolist(), strict=True)}
        if self.loss_fn.gradnorm is not None:
            s.gradnorm_state = {k: v.tolist() for k, v in self.loss_fn.gradnorm.state_dict().items()}
        # Only a validation of exactly these weights may rank this checkpoint (not an earlier step's numbers).
        if self.last_val_step == s.step and self.ckpt.best_metric in self.last_val:
            s.best_checkpoints = self.ckpt.update_bests(s.best_checkpoints, s.step, self.last_val)
        path = self.ckpt.save(self.accelerator, s.step, s.to_dict())
        self.last_saved_step = s.step
        log.info("checkpoint saved: %s", path)
        return path

    def _export(self) -> None:
        """Consolidated fp32 weights of the final and best checkpoints (main process; reads files only)."""
        if not self.is_main:
            return
        latest = self.ckpt.latest()
        meta = {"model": self.cfg.MODEL.NAME, "step": str(self.state.step)}
        if latest is not None:
            export_weights(latest, self.run / "export" / "final.safetensors", meta)
        best = self.state.best_checkpoints[0] if self.state.best_checkpoints else None
        if best and (self.ckpt.root / best["dir"]).is_dir():
            export_weights(
                self.ckpt.root / best["dir"],
                self.run / "export" / "best.safetensors",
                {**meta, "step": str(best["step"])},
            )
        log.info("exported weights to %s", self.run / "export")

    # -------------------------------------------------------------------------------------------------- loop
    def fit(self) -> int:
        acc, s, plan = self.accelerator, self.state, self.plan
        self._summary()
        self._init_trackers()
        preempt = PreemptionFlag()
        self.last_val: dict[str, float] = {}
        self.last_val_step = -1
        self.last_saved_step = s.step if self.resume_from is not None else -1
        missing_local = 0
        gen = torch.Generator(device=acc.device)
        self.model.train()
        window_loss = torch.zeros((), device=acc.device)
        # Running sums stay on the device: a float() per micro-batch would stall the GPU pipeline every step.
        window_tasks: dict[str, torch.Tensor] = {}
        window_n = 0
        window_start = time.perf_counter()
        bar = None
        if self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=plan.total_steps, initial=s.step, desc="train", unit="step", dynamic_ncols=True)
        while s.step < plan.total_steps:
            self.train_batches.set_epoch(s.epoch, start_batch=s.batch_in_epoch)
            micro = 0
            lr = self._set_lr()
            for batch in self.train_batches:
                if "image_ok" in batch:
                    missing_local += int((~batch["image_ok"].bool()).sum())
                batch = _to_device(batch, acc.device)
                # Augmentation randomness is a pure function of (seed, rank, step, micro-batch): exact on resume.
                gen.manual_seed(hash((self.cfg.MISC.SEED, self.dist.rank, s.step, micro)) % 2**63)
                with acc.accumulate(self.model):
                    loss, per_task = self._train_step(batch, gen, first_micro=micro == 0)
                    if acc.sync_gradients and not self.dist.uses_deepspeed and self.cfg.TRAIN.CLIP_GRAD > 0:
                        acc.clip_grad_norm_(self.model.parameters(), self.cfg.TRAIN.CLIP_GRAD)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                micro += 1
                s.batch_in_epoch += 1
                window_loss += loss
                for k, v in per_task.items():
                    window_tasks[k] = window_tasks[k] + v if k in window_tasks else v.clone()
                window_n += 1
                if not acc.sync_gradients:
                    continue
                s.step += 1
                s.samples_seen += self.cfg.DATA.BATCH_SIZE * self.accum * self.dist.world_size
                micro = 0
                if bar is not None:
                    bar.update(1)
                if fires(self.ops.log_every, s.step, plan):
                    elapsed = time.perf_counter() - window_start
                    # One all-reduce for everything logged: loss, per-rank losses (means over processes) and the
                    # unreadable-image count (a sum, kept as the global total).
                    keys = list(window_tasks)
                    packed = torch.stack([window_loss, *(window_tasks[k] for k in keys)]).float() / max(window_n, 1)
                    packed = acc.reduce(packed, "mean").tolist()
                    missing = acc.reduce(torch.tensor([float(missing_local)], device=acc.device), "sum")
                    s.missing_images += int(missing.item())
                    missing_local = 0
                    mean_loss = packed[0]
                    ips = window_n * self.cfg.DATA.BATCH_SIZE * self.dist.world_size / max(elapsed, 1e-9)
                    row = {"loss": mean_loss, "lr": lr, "images_per_sec": ips}
                    row |= {f"{k}/loss": v for k, v in zip(keys, packed[1:], strict=True)}
                    row["meta_mask_prob"] = self.ops.meta_mask_prob(s.step)
                    if self.loss_fn.gradnorm is not None:
                        row |= {
                            f"{k}/weight": float(w)
                            for k, w in zip(self.task_keys, self.loss_fn.task_weights.tolist(), strict=True)
                        }
                    self._log("train", row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{ips:.0f}", lr=f"{lr:.2e}")
                    window_loss.zero_()
                    window_tasks, window_n, window_start = {}, 0, time.perf_counter()
                paused = time.perf_counter()  # validation and checkpoints are not training throughput
                do_val = fires(self.ops.val_every, s.step, plan)
                do_masked = fires(self.ops.val_mask_meta_every, s.step, plan)
                if do_val or do_masked:
                    self._run_validation(with_masked=do_masked, do_normal=do_val or not self.last_val)
                epoch_done = s.batch_in_epoch >= self.batches_per_epoch
                if epoch_done:
                    s.epoch += 1
                    s.batch_in_epoch = 0
                # Agreeing costs an all-reduce and a host sync, so ranks compare flags every few steps (the same
                # steps on every rank); SLURM's warning comes minutes ahead, so a few steps' delay is harmless.
                stop = s.step % PREEMPT_CHECK_STEPS == 0 and self._agree(preempt.raised)
                if stop or fires(self.ops.ckpt_every, s.step, plan):
                    self._save()
                if stop:
                    log.warning(
                        "received %s: checkpoint saved at step %d; exiting with code %d so the job can be "
                        "resumed by rerunning the same command",
                        preempt.signal_name or "a signal on another rank",
                        s.step,
                        PREEMPTED_EXIT_CODE,
                    )
                    if bar is not None:
                        bar.close()
                    acc.end_training()
                    return PREEMPTED_EXIT_CODE
                window_start += time.perf_counter() - paused
                if s.step >= plan.total_steps or epoch_done:
                    break
                lr = self._set_lr()
        if bar is not None:
            bar.close()
        if self.last_saved_step != s.step:  # in-memory, identical on every rank: this decides a collective
            self._save()
        self._export()
        skipped = self.train_batches.skipped_samples
        if skipped:
            log.warning("%d corrupt shard members were skipped during training", int(skipped))
        if s.missing_images:
            log.warning(
                "%d unreadable images were replaced during training (DATA.HYBRID.ALLOW_MISSING_IMAGES)",
                s.missing_images,
            )
        acc.wait_for_everyone()
        acc.end_training()
        log.info("training finished at step %d; run folder %s", s.step, self.run)
        return 0


def train(cfg: Config) -> int:
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.fit()
    except LinnaeusError as err:
        # Bad input: one line (a worker's copy of the error carries the worker traceback; strip it).
        from linnaeus.data.loader import unwrap_worker_error

        clean = unwrap_worker_error(err)
        if log.handlers:
            log.error("%s", clean)
        raise clean from None
    except Exception:
        # Log the traceback into the run's log files before the process dies, on whichever rank failed.
        if log.handlers:
            log.exception("training failed")
        raise
