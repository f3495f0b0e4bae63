"""Accelerator construction: the one place that knows about launchers, backends, DeepSpeed and precision.

The same code serves 1 CPU process, N CPU processes (gloo), one GPU, DDP, DeepSpeed ZeRO-1/2/3 and multi-node; what
differs comes from the accelerate config the user launched with.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from linnaeus.specs.engine import LoopSpec
from linnaeus.specs.launch import LaunchFacts

log = logging.getLogger("linnaeus")


def prepare_environment() -> None:
    """Environment facts that must be settled before deepspeed or accelerate are imported."""
    if not torch.cuda.is_available():
        # DeepSpeed otherwise probes for CUDA and fails to build its ops on CPU-only machines.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _launched() -> bool:
    """True under a launcher that started several processes (torchrun / accelerate / deepspeed / MPI)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def _deepspeed_json_precision() -> str | None:
    """bf16/fp16 when the launched DeepSpeed JSON switches one on explicitly (not "auto")."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or not os.path.isfile(path):
        return None
    with open(path) as fh:
        ds = json.load(fh)
    for name in ("bf16", "fp16"):
        if ds.get(name, {}).get("enabled") is True:
            return name
    return None


def resolve_precision(amp_opt_level: str | None) -> tuple[str, str]:
    """(mixed_precision, why). The accelerate/DeepSpeed config wins when it asks for half precision;
    otherwise TRAIN.AMP_OPT_LEVEL decides (O0 = fp32, O1-O3 = bf16 where supported, else fp16)."""
    from_json = _deepspeed_json_precision()
    if from_json:
        return from_json, "DeepSpeed config"
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher in ("bf16", "fp16", "fp8"):
        return launcher, "accelerate config"
    level = amp_opt_level
    if level in (None, "O0"):
        return "no", "TRAIN.AMP_OPT_LEVEL" if level else "default"
    if torch.cuda.is_available():
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), "TRAIN.AMP_OPT_LEVEL"
    return "bf16", "TRAIN.AMP_OPT_LEVEL"


@dataclass
class DistInfo:
    world_size: int
    rank: int
    zero_stage: int  # 0 = not DeepSpeed
    precision: str
    precision_source: str
    distributed_type: str
    num_machines: int

    @property
    def uses_deepspeed(self) -> bool:
        return self.zero_stage > 0

    @property
    def launch_facts(self) -> LaunchFacts:
        """What the cross-key rules need to know of this launch (``linnaeus.config.resolve``)."""
        return LaunchFacts(
            source="this launch",
            deepspeed=self.uses_deepspeed,
            zero_stage=self.zero_stage,
            precision=self.precision,
            processes=self.world_size,
        )

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype inputs are cast to: DeepSpeed's engine runs in bf16/fp16 without autocast; otherwise fp32
        (accelerate's autocast handles mixed precision)."""
        if self.uses_deepspeed and self.precision in ("bf16", "fp16"):
            return torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.float32


def build_accelerator(loop: LoopSpec, tracker_kwargs: dict[str, Any] | None = None):
    """Create the Accelerator. DeepSpeed's "auto" entries are filled from the experiment config here, so batch size,
    accumulation and clipping have one source of truth (the experiment YAML). ``tracker_kwargs``:
    ``TrackerPlan.accelerator_kwargs()`` (engine/trackers.py)."""
    prepare_environment()
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    precision, source = resolve_precision(loop.amp_opt_level)
    accum, micro_batch_size = max(1, loop.accumulation), loop.micro_batch
    kwargs_handlers = [
        # Generous timeout: startup scans (labels, image verification) can be long on big datasets.
        InitProcessGroupKwargs(
            timeout=datetime.timedelta(minutes=60),
            # Without CUDA accelerate forms the process group only when a backend is given explicitly.
            **({"backend": "gloo"} if _launched() and not torch.cuda.is_available() else {}),
        )
    ]
    uses_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(
        # On CUDA-less machines torchrun-started processes only become multi-CPU DDP with cpu=True; DeepSpeed needs
        # cpu=False (accelerate disables it otherwise) and runs on DS_ACCELERATOR=cpu instead.
        cpu=not torch.cuda.is_available() and not uses_deepspeed,
        mixed_precision=precision,
        gradient_accumulation_steps=accum,
        kwargs_handlers=kwargs_handlers,
        # Our loaders are built per rank by our own sampler; the scheduler is stepped by us, once per optimizer step.
        dataloader_config=DataLoaderConfiguration(split_batches=False, dispatch_batches=False),
        step_scheduler_with_optimizer=False,
        **(tracker_kwargs or {}),
    )
    zero_stage = 0
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        ds = plugin.deepspeed_config
        zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds["gradient_accumulation_steps"] = accum
        ds["train_batch_size"] = micro_batch_size * accum * accelerator.num_processes
        clip = loop.clip_grad
        ds["gradient_clipping"] = float(clip) if clip and clip > 0 else 0.0
        plugin.gradient_accumulation_steps = accum
    info = DistInfo(
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        zero_stage=zero_stage,
        precision=precision,
        precision_source=source,
        distributed_type=str(accelerator.distributed_type).split(".")[-1],
        num_machines=int(os.environ.get("ACCELERATE_NUM_MACHINES", os.environ.get("GROUP_WORLD_SIZE", 1)) or 1),
    )
    return accelerator, info


def decide_on_main(accelerator: Any, decide: Callable[[], Any]) -> Any:
    """``decide()`` run on the main process only (file reads that every rank must agree on), its result on every
    process. Collective. A ``LinnaeusError`` it raises is raised on every process, so a refusal (a tampered
    checkpoint, a busy run folder) is one line from each rank instead of one rank's error and the others waiting
    forever at the next collective."""
    from accelerate.utils import broadcast_object_list

    from linnaeus import errors

    box: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            box = [("ok", decide())]
        except errors.LinnaeusError as err:
            box = [("error", type(err).__name__, str(err))]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    if box[0][0] == "error":
        raise getattr(errors, box[0][1], errors.LinnaeusError)(box[0][2])
    return box[0][1]
