"""``linnaeus env``: the environment in a few lines, for bug reports (like ``accelerate env`` / ``ds_report``).

Versions of the libraries a run depends on, the devices torch sees, which DeepSpeed ops are prebuilt or built by the
JIT loader in the torch extensions folder, and which experiment trackers import.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("linnaeus", "torch", "torchvision", "accelerate", "deepspeed", "timm", "transformers", "polli-typus")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> str:
    import torch

    from linnaeus.engine.distributed import device_summary

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
        return f"cuda x{n}, {' / '.join(names)}"
    return device_summary(torch.device("cpu"), 1)


def _nccl() -> str:
    import torch

    try:
        v = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return "not available"
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _deepspeed_ops() -> str:
    """Prebuilt ops (installed with DS_BUILD_*) and ops the JIT loader has built in the torch extensions folder."""
    from linnaeus.utils import quiet

    quiet.settle_deepspeed_accelerator()
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return "deepspeed not importable"
    prebuilt = sorted(k for k, v in installed_ops.items() if v)
    from linnaeus.engine.launch_checks import DS_CPU_COMM_OP, deepspeed_op_build_dir

    quiet.install()  # torch's extension loader's "No CUDA runtime is found" would land in the middle of the paste
    root = deepspeed_op_build_dir(DS_CPU_COMM_OP).parent
    built = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.so"))) if root.is_dir() else []
    return f"prebuilt: {', '.join(prebuilt) or 'none'}; JIT-built in {root}: {', '.join(built) or 'none'}"


def _trackers() -> str:
    from linnaeus.engine.trackers import TRACKER_PACKAGES, missing_tracker

    ok = [name for name in TRACKER_PACKAGES if missing_tracker(name) is None]
    missing = [name for name in TRACKER_PACKAGES if name not in ok]
    return f"csv, {', '.join(ok)} import; missing: {', '.join(missing) or 'none'}"


def env_report() -> dict[str, str]:
    import torch

    report = {"python": f"{platform.python_version()} ({sys.executable})", "platform": platform.platform()}
    report |= {p: _version(p) for p in PACKAGES}
    report["torch CUDA / cuDNN"] = f"{torch.version.cuda or 'none'} / {torch.backends.cudnn.version() or 'none'}"
    report["NCCL"] = _nccl()
    report["devices"] = _devices()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report["CPU cores usable"] = str(cores)
    report["DeepSpeed ops"] = _deepspeed_ops()
    report["trackers"] = _trackers()
    for var in ("CUDA_VISIBLE_DEVICES", "TORCH_EXTENSIONS_DIR", "LINNAEUS_ALLOW_CPU"):
        if var in os.environ:
            report[var] = os.environ[var]
    report["checkout"] = str(Path(__file__).resolve().parents[2])
    return report


def run(args: argparse.Namespace) -> int:
    report = env_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return 0
