"""What the launch decides and the experiment config cannot (read by ``linnaeus.config.launch_facts``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchFacts:
    source: str  # where the facts were read, for error lines
    deepspeed: bool = False
    zero_stage: int = 0
    precision: str | None = None  # "bf16" / "fp16" / "no" when the launch fixes it; None: TRAIN.AMP_OPT_LEVEL decides
    processes: int = 1
