"""The one place where third-party noise is settled: every filter here says why it cannot be fixed at the source.

Call ``install()`` once, first thing, in every entry point that may import torch.distributed or DeepSpeed.
"""

from __future__ import annotations

import logging
import os
import warnings

_installed = False


def install() -> None:
    """Idempotent; cheap (does not import torch)."""
    global _installed
    if _installed:
        return
    _installed = True
    # DeepSpeed's ZeRO gathers call torch.distributed.all_gather_into_tensor, which torch now marks deprecated; the
    # call is inside DeepSpeed (deepspeed/comm/torch.py), so we cannot switch it to the new name ourselves.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated", category=FutureWarning)
    # Depthwise convolutions (groups == channels, weight shape (C, 1, k, k)) get a gradient whose stride differs
    # from the weight's only on the size-1 dimension: the same memory layout, but DDP compares strides literally
    # and warns on the first backward of every run. Nothing to fix on our side; the layout is torch's choice.
    warnings.filterwarnings("ignore", message=r"Grad strides do not match bucket view strides", category=UserWarning)
    # torch's C++ extension loader logs "No CUDA runtime is found, using CUDA_HOME=..." from every process that
    # imports it (DeepSpeed does) on a machine without CUDA; it is not a problem there, and the run summary's
    # device row says what the run trains on.
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not str(record.msg).startswith("No CUDA runtime is found")
    )


def settle_deepspeed_accelerator() -> None:
    """Avoided at the source, not filtered: without CUDA, DeepSpeed auto-detects its accelerator and warns "Setting
    accelerator to CPU..." on every import. Naming it before the first import makes the warning go away. Must run
    before deepspeed is imported (train, export and ``predict --run`` all may import it)."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
