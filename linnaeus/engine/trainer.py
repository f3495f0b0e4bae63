"""The training job: one Accelerator, one nn.Module, one optimizer, a step-based loop with epochs as a view.

``fit`` reads top to bottom: take the next accumulation window, take one optimizer step over it, then let the
registered after-step actions that are due act (train row, progress, EMA, validation, checkpoint, unfreeze). Each
component lives in its own module and takes its own spec (``linnaeus.specs.engine``); this file is the only engine
code that reads the config: it builds and wires them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from linnaeus.config import Config, config_to_dict, dump_config
from linnaeus.config.resolve import batch_fill_problem, cross_key_problems, raise_problems, resolve
from linnaeus.engine.after_step import AfterStep, always, run_after_step
from linnaeus.engine.arch_from_weights import follow_pretrained_weights
from linnaeus.engine.checkpointer import Checkpointer, ResumePoint, resume_candidate
from linnaeus.engine.config_change import agree_config_record, write_config_record
from linnaeus.engine.distributed import (
    build_accelerator,
    decide_on_main,
    device_summary,
    prepare_environment,
    process_identities,
)
from linnaeus.engine.fast_step import StepSpeedups, adamw, compile_forward
from linnaeus.engine.nonfinite import NonFiniteGuard, step_grad_norm
from linnaeus.engine.preemption import Preemption
from linnaeus.engine.progress import Progress, announce
from linnaeus.engine.run_dir import FILE_ONLY_ATTR, RunLock, attach_run_logs, setup_logging
from linnaeus.engine.schedule import LRSchedule, OpsSchedule, period_summary, plan_steps
from linnaeus.engine.tracking import Tracking
from linnaeus.engine.train_meter import TrainMeter
from linnaeus.engine.validation import Validator
from linnaeus.engine.windows import Batch, accumulation_windows
from linnaeus.errors import PREEMPTED_EXIT_CODE, ConfigError, LinnaeusError
from linnaeus.utils.seeds import seed_of

log = logging.getLogger("linnaeus")

__all__ = ["PREEMPTED_EXIT_CODE", "Trainer", "train"]


def _seed_everything(seed: int, deterministic: bool = False) -> None:
    """Python, NumPy and torch (every device) seeded by accelerate; ``MISC.DETERMINISTIC`` asks torch for
    deterministic kernels, warning (not stopping) where one has no deterministic variant."""
    from accelerate.utils import set_seed

    set_seed(seed)  # MISC.SEED < 2**32, which NumPy needs
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@dataclass
class MicroBatch:
    """One augmented micro-batch of a window and the samples each rank's loss includes."""

    aug: Any  # linnaeus.aug.AugOutput
    included: dict[str, torch.Tensor]
    view_mask: torch.Tensor | None = None  # (B, K) for observations; ``aug.images`` then holds B*K views
    images: int = 0  # photos in it (views present for observations), counted on the host


class LossState:
    """The loss's checkpointed state: task weights (for reading) and GradNorm's learned weights (restored)."""

    def __init__(self, loss_fn: Any) -> None:
        self.loss_fn = loss_fn

    def state_dict(self) -> dict[str, Any]:
        weights = self.loss_fn.task_weights.tolist()
        state: dict[str, Any] = {"task_weights": dict(zip(self.loss_fn.task_keys, weights, strict=True))}
        gn = self.loss_fn.gradnorm
        state["gradnorm_state"] = {k: v.tolist() for k, v in gn.state_dict().items()} if gn is not None else {}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gn, saved = self.loss_fn.gradnorm, state.get("gradnorm_state")
        if gn is not None and saved:
            current = gn.state_dict()
            gn.load_state_dict({k: torch.as_tensor(v, dtype=current[k].dtype) for k, v in saved.items()})


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # The config read once (every rule between keys checked); the engine's components read ``self.spec``.
        # Before the config is resolved and recorded: the architecture follows the pretrained weights it receives.
        self.arch_note = follow_pretrained_weights(cfg)
        self.specs, problems = resolve(cfg)
        raise_problems(problems)
        self.spec = self.specs.engine
        self.run = cfg.EXPERIMENT.run_folder()
        self.step = 0  # optimizer steps taken
        self.started = time.perf_counter()
        self.finished_step: int | None = None  # set when a rerun finds nothing left to do
        self.ema: Any = None  # EmaComponent when TRAIN.EMA.ENABLED

    def _from_main(self, value: Any) -> Any:
        """The main process's ``value`` on every process (every process calls this at the same point)."""
        return decide_on_main(self.accelerator, lambda: value)

    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Collective: ``t`` summed over the processes."""
        return self.accelerator.reduce(t, "sum")

    @property
    def task_keys(self) -> list[str]:
        return list(self.data.task_keys)

    # -------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, spec = self.cfg, self.spec
        self._start_accelerator()
        # The rules between the config and this launch (ZeRO stage, precision), before anything heavy is built.
        raise_problems(cross_key_problems(cfg, launch=self.dist.launch_facts))
        acc = self.accelerator
        if self.arch_note is not None:
            log.info("%s", self.arch_note)
        # Before heavy work and before config.yaml is (re)written: a resume with a changed config is refused here.
        find = lambda: resume_candidate(spec.checkpoint, self.run / "checkpoints")  # noqa: E731
        record = agree_config_record(acc, self.run, config_to_dict(cfg), spec.checkpoint.allow_config_change, find)
        if not torch.cuda.is_available():
            # Near-zero values (LayerScale starts at 1e-6) become denormals in CPU kernels, which run ~4x slower.
            torch.set_flush_denormal(True)

        from linnaeus.data.paths import IMAGES_DIR_UNSET
        from linnaeus.data.prepare import prepare_data

        # A resumed run reads the split it saved (a changed labels file is then an error, not a silent new split);
        # image verification runs on the main process (on every process when its limits leave rows out).
        if cfg.DATA.HYBRID.VERIFY_IMAGES.ENABLED and acc.is_main_process:
            announce("verifying every image file (DATA.HYBRID.VERIFY_IMAGES)", "one pass over the image folder")
        if not cfg.DATA.HYBRID.IMAGES_DIR:  # validation always reads image files, shards or not
            raise ConfigError(IMAGES_DIR_UNSET)
        self.data = prepare_data(
            self.specs.data, split_file=self.run / "split.npz", check_images=acc.is_main_process, share=self._from_main
        )

        ranks = process_identities(acc)  # named by the lock, so a refused second run can tell whom to stop

        def take_folder() -> None:
            self.run.mkdir(parents=True, exist_ok=True)
            RunLock.acquire(self.run, ranks=ranks)  # refuses a folder another run is using; released at exit

        decide_on_main(acc, take_folder)  # a busy folder stops every rank with the same line
        attach_run_logs(self.run, acc.process_index, acc.is_main_process)
        # A changed config replaces config.yaml only once its resume has succeeded: a resume that fails leaves the
        # folder describing the checkpoints it holds.
        record_now = not record.keep_old_as
        if acc.is_main_process:
            if record_now:
                write_config_record(record, self.run, dump_config(cfg))
            log.info("config: %s; BASE files: %s", self.run / "config.yaml", ", ".join(cfg.BASE_RESOLVED) or "none")
            self.data.save(self.run)
        self._build_data()
        self._build_components()
        self.finished_step = self.checkpointer.finished_step(self.run / "export")
        if self.finished_step is None:
            self._build_model_and_optimizer()
        if acc.is_main_process and not record_now:
            write_config_record(record, self.run, dump_config(cfg))

    def _start_accelerator(self) -> None:
        """The accelerator (with its trackers), the step speedups, console logging and the seeds."""
        prepare_environment()
        from linnaeus.engine.trackers import plan_trackers

        spec = self.spec
        trackers = plan_trackers(spec.tracking, self.run).accelerator_kwargs()
        self.accelerator, self.dist = build_accelerator(spec.loop, trackers)
        acc = self.accelerator
        self.speedups = StepSpeedups.resolve(spec.speedups, acc.device, uses_deepspeed=self.dist.uses_deepspeed)
        # Console logging now; the run folder and its log files only after the data preflight passed, so a failed
        # start leaves no folder behind (what was logged before is written to train.log then).
        setup_logging(None, acc.process_index, acc.is_main_process, self.cfg.EXPERIMENT.LOG_LEVEL)
        _seed_everything(spec.loop.seed, spec.loop.deterministic)

    def _build_data(self) -> None:
        from linnaeus.data.device_decode import DeviceDecoder, resolve_decode_mode
        from linnaeus.data.loader import build_loader
        from linnaeus.data.stream import build_train_batches

        cfg, d = self.cfg, self.dist
        # DATA.DECODE device: workers ship JPEG bytes + crop plans; the batch is decoded on the training device
        # (on a CPU device by the same decoder in the workers, "worker"; the decoder below then only counts).
        decode = resolve_decode_mode(cfg.DATA.DECODE, self.accelerator.device)
        self.decoder = DeviceDecoder(allow_missing=cfg.DATA.HYBRID.ALLOW_MISSING_IMAGES)
        problem = batch_fill_problem(len(self.data.view("train").rows), self.spec.loop.micro_batch, d.world_size)
        if problem:
            raise ConfigError(problem)
        pin_memory = cfg.DATA.PIN_MEMORY and torch.cuda.is_available()
        # Shards: a plain per-rank loader (never dispatched through rank 0 by accelerate); resampled epochs with a
        # fixed number of batches per rank. Validation stays on files so its metrics are exact.
        self.train_batches = build_train_batches(
            self.data.spec, self.data, world_size=d.world_size, rank=d.rank, pin_memory=pin_memory, decode=decode
        )
        self.plan = plan_steps(self.spec.loop, self.train_batches.batches_per_epoch, world_size=d.world_size)
        val_loader, val_sampler = build_loader(
            self.data.dataset("val", train=False, decode=decode),  # validation decodes like training
            batch_size=cfg.DATA.BATCH_SIZE_VAL,
            shuffle=False,
            drop_last=False,
            pad=True,
            num_workers=cfg.DATA.NUM_WORKERS,
            seed=cfg.MISC.SEED,
            num_replicas=d.world_size,
            rank=d.rank,
            pin_memory=pin_memory,
            prefetch_factor=cfg.DATA.PREFETCH_FACTOR,
        )
        self.ops = OpsSchedule(self.spec.ops, self.plan)
        self.validator = Validator(
            val_loader,
            val_sampler,
            self.task_keys,
            self.spec.validation,
            device=self.accelerator.device,
            dtype=d.model_dtype,
            plan=self.plan,
            reduce_sum=self._reduce_sum,
            memory_format=self.speedups.memory_format,
            # its own decoder, so the decode_fallbacks of train rows count training batches only
            decode=DeviceDecoder(allow_missing=cfg.DATA.HYBRID.ALLOW_MISSING_IMAGES).decode,
        )

    def _build_components(self) -> None:
        from linnaeus.aug import BatchAugment, MetaMasking

        acc, spec = self.accelerator, self.spec
        aug = self.specs.aug
        self.augment = BatchAugment(aug, self.task_keys, self.data.num_classes)
        self.meta_masking = MetaMasking(
            self.data.meta_components, self.data.meta_dims, aug.meta_masking.partial_whitelist
        )
        self.generator = torch.Generator(device=acc.device)
        # Mixing's batch-level draws (gate, algorithm, box) are made on the host so deciding never waits for the GPU.
        self.host_generator = self.generator if acc.device.type == "cpu" else torch.Generator()
        self.lr_schedule = LRSchedule(spec.lr, self.plan)
        decoder = self.decoder
        self.meter = TrainMeter(
            self.task_keys, acc.device, self.plan, spec.loop.log_every, decode_fallbacks=lambda: decoder.fallbacks
        )
        self.tracking = Tracking(acc, spec.tracking, self.run, self.plan)
        self.checkpointer = Checkpointer(
            acc, self.run / "checkpoints", spec.checkpoint, self.plan, self.dist.zero_stage
        )
        self.checkpointer.split_digest = self.data.split.digest  # a resume on another split is refused
        self.checkpointer.prepare_folder()
        self.checkpointer.register("meter", self.meter.counters)
        d = self.dist
        self.nonfinite = NonFiniteGuard(
            self.task_keys,
            acc.device,
            spec.nonfinite,
            reduce_max=None if acc.num_processes == 1 else lambda x: acc.reduce(x, "max"),
            scaler_skips=d.precision == "fp16",
        )
        self.checkpointer.register("nonfinite", self.nonfinite)
        self.checkpointer.register("tracking", self.tracking)
        self.checkpointer.register("validation", self.validator)

    def _build_model_and_optimizer(self, resume: ResumePoint | None = None) -> None:
        """Model, optimizer and loss, prepared; resumed from ``resume`` (default: the checkpointer's choice). Also
        called at ``MODEL.UNFREEZE_BACKBONE_AFTER`` with the checkpoint just saved there (see ``_unfreeze``)."""
        resume = resume or self.checkpointer.find_resume()
        model, resume = self._build_model(resume)
        loss_fn = self._build_loss()
        fast = self.speedups
        if fast.channels_last_weights:  # before the optimizer and the EMA copy see the parameters
            model = model.to(memory_format=torch.channels_last)
        optimizer = self._build_optimizer(model)
        if resume is not None and not resume.exact:
            self.checkpointer.load_weights(model, resume)
        self._attach_ema(model)  # plain module, whole parameters: before prepare
        self.checkpointer.register_record("freeze", self.freeze)
        if fast.compile:  # after the EMA copy, which stays eager
            announce("torch.compile: the first training and validation steps compile the model", "about 1-3 min")
            compile_forward(model)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]  # what clipping and the norm see
        self.shared_params = (
            self.accelerator.unwrap_model(self.model).gradnorm_shared_parameters() if loss_fn.gradnorm else []
        )
        self.loss_fn = loss_fn.to(self.accelerator.device)
        self.checkpointer.register("loss", LossState(self.loss_fn))
        if resume is not None:
            self.step = self.checkpointer.restore(resume)

    def _build_model(self, resume: ResumePoint | None) -> tuple[torch.nn.Module, ResumePoint | None]:
        """The model with its backbone frozen as of the resume step; the resume point downgraded to weights only
        when the checkpoint's optimizer covers other parameters (saved before the unfreeze step)."""
        import dataclasses

        from linnaeus.engine.finetune import FreezeState
        from linnaeus.models import build_model

        hierarchy = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in self.data.hierarchy_matrices().items()}
        model = build_model(
            self.specs.model,
            self.task_keys,
            self.data.num_classes,
            self.data.meta_dims,
            hierarchy,
            class_maps=self.data.class_maps,
            load_pretrained=resume is None,  # a resume continues its checkpoint's weights; the load report is logged
        )
        self.freeze = FreezeState(self.spec.freeze, self.plan)
        self.freeze.apply(model, resume.step if resume is not None else 0, resume.saved if resume is not None else None)
        if resume is not None and resume.exact and not self.freeze.same_optimizer_layout(resume.saved):
            resume = dataclasses.replace(
                resume, exact=False, relayout="set of trainable parameters (backbone unfrozen)"
            )
        return model, resume

    def _build_loss(self) -> Any:
        from linnaeus.losses import build_task_loss, needs_distance_matrices

        spec = self.specs.loss
        return build_task_loss(
            spec,
            self.task_keys,
            self.data.num_classes,
            self.data.distance_matrices() if needs_distance_matrices(spec) else None,
            self.data.class_counts("train"),
        )

    def _build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        from linnaeus.engine.finetune import optimizer_groups

        opt, base_lr = self.spec.optimizer, self.lr_schedule.base_lr
        groups = optimizer_groups(model, opt)
        for g in groups:
            g["lr"] = base_lr * g.get("lr_scale", 1.0)
        return adamw(groups, lr=base_lr, betas=opt.betas, eps=opt.eps, fused=self.speedups.fused_optimizer)

    def _attach_ema(self, model: torch.nn.Module) -> None:
        """``TRAIN.EMA``: the EMA copy (once per run; an unfreeze rebuild keeps it), checkpointed as a file and
        validated as ``val_ema``."""
        from linnaeus.engine.ema import EMA_FILE, EmaComponent

        if self.ema is not None:
            return
        self.ema = EmaComponent.maybe_create(self.spec.ema, model, device=self.accelerator.device)
        if self.ema is not None:
            self.checkpointer.register_file(EMA_FILE, self.ema)
            self.validator.ema = self.ema.module

    # -------------------------------------------------------------------------------------------------- summary
    def _summary(self) -> str:
        d, p = self.dist, self.plan
        params = sum(q.numel() for q in self.accelerator.unwrap_model(self.model).parameters()) / 1e6
        meta = zip(self.data.meta_components, self.data.meta_dims, strict=True)
        processes = "process" if d.world_size == 1 else "processes"
        rows = [
            ("run folder", str(self.run)),
            ("world size", f"{d.world_size} {processes} ({d.distributed_type}, {d.num_machines} machine(s))"),
            ("device", device_summary(self.accelerator.device, d.world_size)),
            ("ZeRO stage", str(d.zero_stage) if d.zero_stage else "none"),
            ("precision", f"{d.precision} (from {d.precision_source})"),
            (
                "batch",
                f"{p.micro_batch} per device x {p.accumulation} accumulation x {p.world_size} = "
                f"{p.global_batch} effective",
            ),
            ("dataset", f"{len(self.data.view('train').rows)} train / {len(self.data.view('val').rows)} val samples"),
            ("split", self.data.split.describe()),
            ("classes", ", ".join(f"{k}: {self.data.num_classes[k]}" for k in self.task_keys)),
            ("metadata", ", ".join(f"{n}({dim})" for n, dim in meta) or "none"),
            ("model", f"{self.spec.checkpoint.model_name} ({params:.2f} M parameters)"),
            ("fast step", self.speedups.summary()),
            (
                "lr",
                f"{self.lr_schedule.name}, base {self.lr_schedule.base_lr:.3g}, warmup {self.lr_schedule.warmup} steps",
            ),
            ("steps", f"{p.total_steps} ({p.steps_per_epoch} per epoch)"),
            ("validation", period_summary(self.validator.every, p)),
            ("validation, metadata masked", period_summary(self.validator.masked_every, p)),
            ("checkpoint", period_summary(self.checkpointer.every, p)),
            *self.ops.summary(),
        ]
        width = max(len(k) for k, _ in rows)
        return "Linnaeus training\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)

    # -------------------------------------------------------------------------------------------------- one step
    def train_step(self, window: list[Batch]) -> None:
        """One optimizer step over an accumulation window, top to bottom: zero the gradients; augment every
        micro-batch and draw its loss inclusion; sum the window's included counts over all processes (one
        all-reduce), so each rank's loss is the mean over every included sample of the step however the labels fall
        into micro-batches and processes; forward/backward per micro-batch (gradients reduced across processes only
        on the last one); then clip, check for non-finite values and step, once, after the loop."""
        step = self.step
        self.optimizer.zero_grad(set_to_none=True)
        self._set_lr(step)
        micro = [self._augment(batch, step, i) for i, batch in enumerate(window)]
        denominators = self._denominators(micro)
        gradnorm = self.loss_fn.gradnorm
        losses = [
            self._accumulate(m, denominators, gradnorm_due=gradnorm is not None and i == 0 and gradnorm.due(step))
            for i, m in enumerate(micro)
        ]
        self._optimizer_step(step)
        if not self.nonfinite.step_dropped:  # a skipped step's losses would make the logged mean NaN (fp16 too)
            for (total, per_task), m in zip(losses, micro, strict=True):
                self.meter.add(total, per_task, m.images)
        self.step += 1

    def _set_lr(self, step: int) -> None:
        lr = self.lr_schedule.lr(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def _accumulate(
        self, m: MicroBatch, denominators: dict[str, torch.Tensor], gradnorm_due: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward/backward of one micro-batch under accelerate's ``accumulate``: DDP reduces gradients only on the
        window's last micro-batch (its sync step); DeepSpeed's engine counts micro-batches itself and applies the
        step inside that backward."""
        with self.accelerator.accumulate(self.model):
            total, per_task = self._forward_backward(m, denominators, gradnorm_due)
        self.nonfinite.add(total, per_task)
        return total, per_task

    def _optimizer_step(self, step: int) -> None:
        """Collective. The window is whole, so its last micro-batch was accelerate's sync step and the gradients
        are complete: clip (and read the norm), check for non-finite losses and gradients, step. Under DeepSpeed the
        engine already clipped and stepped inside the last backward (accelerate's optimizer wrapper no-ops ``step``
        and ``zero_grad`` there); the check reads the engine's norm of that step."""
        acc, d = self.accelerator, self.dist
        if not acc.sync_gradients:  # a host flag: would mean a window and accelerate's counter disagree
            raise RuntimeError(f"step {step + 1}: the accumulation window did not end on accelerate's sync step")
        norm = step_grad_norm(acc, self.model, self.trainable, self.spec.loop.clip_grad, d.uses_deepspeed, d.precision)
        if self.nonfinite.check(step, norm):  # collective; raises when the run must stop
            self.optimizer.zero_grad(set_to_none=True)  # skipped: nothing left to apply
        self.optimizer.step()

    def _augment(self, batch: Batch, step: int, micro: int) -> MicroBatch:
        from accelerate.utils import send_to_device

        host_mask = batch.get("view_mask")  # still on the host here: counting the photos costs no device sync
        photos = int(host_mask.sum()) if host_mask is not None else len(batch["meta"])
        batch = self.decoder.decode(batch, self.accelerator.device)  # no-op for batches decoded in workers
        self.meter.counters.count_missing(batch)
        batch = send_to_device(batch, self.accelerator.device, non_blocking=True)
        ops, gen = self.ops, self.generator
        # Augmentation randomness is a pure function of (seed, rank, step, micro-batch), by the rule the loader's
        # workers follow for their crops (linnaeus.utils.seeds): exact on resume.
        seed = seed_of(self.spec.loop.seed, self.dist.rank, step, micro)
        gen.manual_seed(seed)
        if self.host_generator is not gen:
            self.host_generator.manual_seed(seed)
        meta, meta_valid = self.meta_masking(
            batch["meta"],
            batch["meta_valid"],
            p_all=ops.meta_mask_prob(step),
            p_partial=ops.partial_meta_mask_prob(step),
            generator=gen,
        )
        images, view_mask = batch["image"], batch.get("view_mask")
        if view_mask is not None:  # an observation's views are augmented each as an image; the model pools them
            images = images.flatten(0, 1)
        out = self.augment(
            images,
            batch["targets"],
            meta,
            meta_valid,
            mix_prob=ops.mix_prob(step),
            generator=gen,
            host_generator=self.host_generator,
        )
        included = self.loss_fn.inclusion(out.targets, out.valid, ops.null_keep_prob(step), gen)
        return MicroBatch(out, included, view_mask, photos)

    def _denominators(self, micro: list[MicroBatch]) -> dict[str, torch.Tensor]:
        from linnaeus.losses import included_counts, step_denominators

        counts = torch.stack([included_counts(m.included, self.task_keys) for m in micro]).sum(0)
        counts = self._reduce_sum(counts)
        return step_denominators(counts, self.task_keys, self.plan.accumulation, self.plan.world_size)

    def _forward_backward(
        self, m: MicroBatch, denominators: dict[str, torch.Tensor], gradnorm_due: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dtype, out = self.dist.model_dtype, m.aug
        images = out.images.to(dtype, memory_format=self.speedups.memory_format)
        views = {} if m.view_mask is None else {"view_mask": m.view_mask}
        logits = self.model(images, out.meta.to(dtype) if out.meta.shape[1] else None, **views)
        logits = {k: v.float() for k, v in logits.items()}  # losses in fp32
        losses = self.loss_fn.task_losses(
            logits, out.targets, out.valid, included=m.included, denominators=denominators
        )
        if gradnorm_due:
            # Per-rank gradient norms via autograd.grad: no .grad is touched, no DDP hook fires; averaged over ranks.
            reduce = lambda t: self.accelerator.reduce(t, "mean")  # noqa: E731
            self.loss_fn.gradnorm.update_weights(losses, self.shared_params, reduce=reduce)
        total = self.loss_fn.combine(losses)
        self.accelerator.backward(total)
        return total.detach(), {k: v.detach() for k, v in losses.items()}

    # -------------------------------------------------------------------------------------------------- loop
    def fit(self) -> int:
        """Train to the plan's last step: 0 when done, ``PREEMPTED_EXIT_CODE`` after a preemption checkpoint."""
        if self.finished_step is not None:
            log.info(
                "already complete: step %d of %d; nothing to do (run folder %s)",
                self.finished_step,
                self.plan.total_steps,
                self.run,
            )
            return 0
        self._begin()
        windows = self.meter.timed(accumulation_windows(self.train_batches, self.plan, start_step=self.step))
        while self.step < self.plan.total_steps:
            self.train_step(next(windows))
            if self.after_step():
                return self._stop_preempted()
        return self._finish()

    def after_step(self) -> bool:
        """The registered after-step actions that are due, in order; the non-finite guard is settled first when any
        of them publishes (see ``linnaeus.engine.after_step``). True: stop (preempted, checkpoint saved)."""
        stop = self.preemption.agreed(self.step)
        run_after_step(self.after_actions, self.step, stop, settle=self.nonfinite.settle)
        return stop

    def _after_actions(self) -> list[AfterStep]:
        """What acts after an optimizer step, in order. ``publishes=False`` only for actions that keep everything
        in this process (the console progress line shows the last logged row)."""
        ema = self.ema
        return [
            AfterStep("train row", lambda s, stop: self.meter.due(s), lambda s, stop: self._log_train(s)),
            AfterStep("progress", always, lambda s, stop: self.progress.update(s, **self.last_train), publishes=False),
            *([AfterStep("ema", always, lambda s, stop: ema.update(self.model, s), publishes=False)] if ema else []),
            AfterStep("validation", lambda s, stop: self.validator.due(s), lambda s, stop: self._validate(s)),
            AfterStep("checkpoint", lambda s, stop: stop or self.checkpointer.due(s), lambda s, stop: self._save(s)),
            AfterStep("unfreeze", lambda s, stop: not stop and self.freeze.due(s), lambda s, stop: self._unfreeze(s)),
        ]

    def _validate(self, step: int) -> None:
        with self.meter.paused():  # validation is not training throughput
            self.validator.maybe_run(step, self.model, lambda phase, m: self.tracking.log(phase, step, m))

    def _save(self, step: int) -> None:
        """Collective: the run counters summed over the processes, then the checkpoint of ``step``."""
        with self.meter.paused():  # checkpoints are not training throughput
            self.meter.counters.sync(self._reduce_sum)
            self.checkpointer.save(step, self.validator.metrics_at(step))

    def _unfreeze(self, step: int) -> None:
        """``MODEL.UNFREEZE_BACKBONE_AFTER``: DDP registers only the parameters that require grad when it wraps the
        model and DeepSpeed cannot add parameters to its optimizer, so the run checkpoints here and rebuilds model
        and optimizer from that checkpoint with the backbone trainable (as a resume from it would). Collective."""
        if self.checkpointer.last_saved_step != step:
            self._save(step)
        with self.meter.paused():  # rebuilding is not training throughput
            self._rebuild_unfrozen(step)

    def _rebuild_unfrozen(self, step: int) -> None:
        self.model = self.optimizer = None
        self.accelerator.free_memory()
        self._build_model_and_optimizer(self.checkpointer.point_at(step))
        self.model.train()
        log.info("backbone unfrozen after step %d: model and optimizer rebuilt with every parameter trainable", step)

    def _log_train(self, step: int) -> None:
        row = self.meter.flush(self._reduce_sum)  # collective
        row |= {"lr": self.lr_schedule.lr(step - 1), "meta_mask_prob": self.ops.meta_mask_prob(step)}
        if self.loss_fn.gradnorm is not None:
            weights = self.loss_fn.task_weights.tolist()
            row |= {f"{k}/weight": float(w) for k, w in zip(self.task_keys, weights, strict=True)}
        self.tracking.log("train", step, row)
        self.last_train = {"loss": row["loss"], "img_s": row["images_per_sec"], "lr": row["lr"]}

    def _begin(self) -> None:
        log.info("%s", self._summary())
        self.tracking.start(config_to_dict(self.cfg))
        acc = self.accelerator
        alone = acc.num_processes == 1
        self.preemption = Preemption(acc.device, reduce_max=None if alone else lambda t: acc.reduce(t, "max"))
        total = self.plan.total_steps
        every = max(self.spec.loop.log_every, total // 20)  # ~20 progress lines a run
        self.progress = Progress(total=total, initial=self.step, is_main=acc.is_main_process, every_steps=every)
        self.last_train: dict[str, float] = {}
        self.setup_seconds = time.perf_counter() - self.started
        self.model.train()
        self.after_actions = self._after_actions()
        self.meter.restart()

    def _stop_preempted(self) -> int:
        self.progress.close()
        log.warning(
            "received %s: checkpoint saved at step %d; exiting with code %d so the job can be resumed by rerunning "
            "the same command",
            self.preemption.signal_name or "a signal on another rank",
            self.step,
            PREEMPTED_EXIT_CODE,
        )
        self.accelerator.end_training()
        return PREEMPTED_EXIT_CODE

    def _finish(self) -> int:
        self.nonfinite.settle()
        self.progress.close()
        if self.checkpointer.last_saved_step != self.step:  # in-memory, identical on every rank: a collective
            self._save(self.step)
        with self.meter.paused():  # the export is not training time (report, mean img/s)
            self.checkpointer.export(self.run / "export", self.step)
        skipped = self.train_batches.skipped_samples
        if skipped:
            log.warning("%d corrupt shard members were skipped during training", int(skipped))
        missing = self.meter.counters.missing_images
        if missing:
            log.warning(
                "%d unreadable images were replaced during training (DATA.HYBRID.ALLOW_MISSING_IMAGES)", missing
            )
        if self.accelerator.is_main_process:
            self._report()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return 0

    def _report(self) -> None:
        """The end-of-run report (report.json, report.html, plots/), its summary in the log, and the W&B summary."""
        from linnaeus.engine.report import Timings, summary_values, write_report

        meter, ckpt = self.meter.counters, self.checkpointer
        phases = {
            "setup": self.setup_seconds,
            "train": meter.train_seconds,
            "validation": self.validator.seconds,
            "checkpoint": ckpt.save_seconds,
            "export": ckpt.export_seconds,
        }
        timings = Timings(
            total_seconds=time.perf_counter() - self.started,
            phase_seconds=phases,
            mean_images_per_sec=meter.mean_images_per_sec,
            data_wait_share=meter.data_wait_share,
        )
        summary = write_report(self.run, timings)
        log.info("training finished at step %d\n%s", self.step, summary)
        self.tracking.summarize(summary_values(self.run))


def train(cfg: Config) -> int:
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.fit()
    except LinnaeusError as err:
        # Bad input: one line (a worker's copy of the error carries the worker traceback; strip it).
        from linnaeus.data.loader import unwrap_worker_error

        clean = unwrap_worker_error(err)
        if log.handlers:  # the run's log files keep it; the console shows only the CLI's `error:` line
            log.error("%s", clean, extra={FILE_ONLY_ATTR: True})
        raise clean from None
    except Exception:
        # Log the traceback into the run's log files before the process dies, on whichever rank failed.
        if log.handlers:  # the console gets Python's own traceback
            log.exception("training failed", extra={FILE_ONLY_ATTR: True})
        raise
