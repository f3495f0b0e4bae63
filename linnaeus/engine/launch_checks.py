"""Launch sanity, run first on every process before anything is built.

An impossible launch (a GPU accelerate config on a machine without GPUs, more processes than devices) is reported
once, by the first process of the machine, as one ``ConfigError`` line; the other processes exit quietly. Also settles the DeepSpeed config path (relative paths in the shipped accelerate configs) and announces
DeepSpeed's CPU op build (or the wait for another process's build) every time one happens.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from linnaeus.errors import ConfigError

DS_CONFIG_ENV = "ACCELERATE_DEEPSPEED_CONFIG_FILE"
# DeepSpeed's CPU accelerator builds this shared-memory communication op with torch's C++ extension loader the
# first time a multi-process job starts; later jobs load the cached library.
DS_CPU_COMM_OP = "deepspeed_shm_comm"
# Set to 1 to train on the CPU with an accelerate config written for GPUs (bf16, gpu_ids, a GPU DeepSpeed JSON).
ALLOW_CPU_ENV = "LINNAEUS_ALLOW_CPU"
CPU_CONFIGS = "accelerate_configs/cpu_ddp.yaml or cpu_zero2.yaml"


def _uses_deepspeed(environ: Mapping[str, str]) -> bool:
    return environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def local_processes(environ: Mapping[str, str]) -> int:
    return int(environ.get("LOCAL_WORLD_SIZE") or 1)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def gpu_request(environ: Mapping[str, str]) -> str | None:
    """What in the accelerate launch asks for GPUs (None when nothing does, or the user said CPU is meant).

    The shipped CPU configs also say ``use_cpu: false`` (accelerate's CPU mode would change the launcher), so the
    signals are the ones only a GPU config carries: ``gpu_ids``, fp16/bf16 from the launcher, a DeepSpeed JSON with
    fp16/bf16 ``enabled: true``."""
    if _truthy(environ.get("ACCELERATE_USE_CPU")) or _truthy(environ.get(ALLOW_CPU_ENV)):
        return None
    gpus = environ.get("CUDA_VISIBLE_DEVICES")
    launched_by_accelerate = any(k.startswith("ACCELERATE_") for k in environ)
    if gpus and gpus.strip() not in ("", "-1", "all") and launched_by_accelerate:
        return f"gpu_ids {gpus}"
    precision = (environ.get("ACCELERATE_MIXED_PRECISION") or "no").lower()
    if precision in ("fp16", "bf16"):
        return f"mixed_precision {precision}"
    if _uses_deepspeed(environ):
        raw = environ.get(DS_CONFIG_ENV)
        path = Path(raw) if raw and raw != "none" else None
        if path is not None and path.is_file():
            try:
                ds = json.loads(path.read_text())
            except (OSError, ValueError):
                return None  # DeepSpeed reports an unreadable JSON itself, with its path
            for key in ("bf16", "fp16"):
                if isinstance(ds.get(key), dict) and ds[key].get("enabled") is True:
                    return f"DeepSpeed JSON {path.name} with {key} enabled"
    return None


def _no_gpu(asked: str, what: str) -> str:
    return (
        f"the accelerate config asks for {what} ({asked}) but this machine has no usable GPU "
        f"(torch.cuda.is_available() is False); use {CPU_CONFIGS}, or set {ALLOW_CPU_ENV}=1 to train on the CPU anyway"
    )


def launch_problem(environ: Mapping[str, str], cuda_devices: int, cpu_count: int) -> str | None:
    """Why this launch cannot work on this machine, or None. Pure: every process reaches the same answer."""
    n = local_processes(environ)
    if n <= 1:
        asked = gpu_request(environ) if cuda_devices == 0 else None
        return None if asked is None else _no_gpu(asked, "a GPU")
    noun = "process" if n == 1 else "processes"
    on_cpu = cuda_devices == 0 or environ.get("ACCELERATE_USE_CPU", "false").lower() == "true"
    if on_cpu and n > cpu_count:
        return (
            f"accelerate launch started {n} {noun} on this machine, which has no usable GPU and {cpu_count} CPU "
            f"core{'s' if cpu_count != 1 else ''}: the accelerate config is for GPUs or asks for more processes than "
            f"cores; use accelerate_configs/cpu_zero2.yaml or cpu_ddp.yaml, or --num_processes {max(1, min(2, cpu_count))}"
        )
    asked = gpu_request(environ) if cuda_devices == 0 else None
    if asked is not None:
        return _no_gpu(asked, "GPUs")
    if not on_cpu and n > cuda_devices:
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        return (
            f"accelerate launch started {n} {noun} on this machine but only {cuda_devices} "
            f"GPU{'s are' if cuda_devices != 1 else ' is'} visible{where}; set num_processes to {cuda_devices} "
            f"(accelerate launch --num_processes {cuda_devices})"
        )
    return None


def _first_local_process(environ: Mapping[str, str]) -> bool:
    return int(environ.get("LOCAL_RANK") or 0) == 0


def resolve_deepspeed_config(environ: MutableMapping[str, str], search: Path | None = None) -> Path | None:
    """Make the DeepSpeed JSON path named by the accelerate config absolute, so a launch works from any folder.

    accelerate passes ``deepspeed_config_file`` on verbatim and DeepSpeed reads it relative to the working
    directory. A relative path that is not there is looked up next to the Linnaeus checkout (where the shipped
    ``accelerate_configs/`` live); if found, the environment is updated before accelerate reads it."""
    raw = environ.get(DS_CONFIG_ENV)
    if not _uses_deepspeed(environ) or not raw or raw == "none":
        return None
    path = Path(raw)
    if path.is_absolute() or path.is_file():
        if not path.is_file():
            raise ConfigError(f"accelerate config deepspeed_config_file: {raw} does not exist")
        return path.resolve()
    if search is None:
        from linnaeus.config import repo_root

        search = repo_root()
    candidate = search / path
    if not candidate.is_file():
        raise ConfigError(
            f"accelerate config deepspeed_config_file: {raw} not found in the working directory {Path.cwd()} nor in "
            f"{search}; write an absolute path in the accelerate config"
        )
    environ[DS_CONFIG_ENV] = str(candidate.resolve())
    return candidate.resolve()


def deepspeed_op_build_dir(name: str = DS_CPU_COMM_OP) -> Path:
    """Where torch's extension loader keeps a built op (TORCH_EXTENSIONS_DIR or its default root)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / name
    if torch.version.hip is not None:
        accel = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accel = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accel = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{py}_{accel}" / name


def _built_for_this_torch(folder: Path) -> bool:
    """Whether the cached build in ``folder`` was made by this environment. Environments sharing
    ``~/.cache/torch_extensions`` (same Python, same CUDA tag) share the folder, and ninja rebuilds when the compile
    command changes: ``build.ninja`` names the torch headers by the path this environment imports torch from (two
    virtual environments, or two links to one, give two paths), so the path is compared as written, not resolved."""
    import torch

    ninja = folder / "build.ninja"
    if not ninja.is_file():
        return False
    ours = str(Path(torch.__file__).parent / "include")
    return ours in ninja.read_text(errors="replace").split()


def _build_lock_held(folder: Path) -> bool:
    """Whether another process holds torch's build lock for ``folder`` (it is building there right now). Recent torch
    takes an advisory lock on ``lock`` (the file stays behind); older torch's FileBaton lock is the file itself."""
    import torch.utils.cpp_extension as extension

    lock = folder / "lock"
    if not lock.is_file():
        return False
    if not hasattr(extension, "FileLock"):
        return True
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def deepspeed_op_notice(environ: Mapping[str, str], cuda_available: bool) -> str | None:
    """The line to print when this launch will make DeepSpeed build its CPU communication op, or wait for another
    process building it (multi-process, CPU, no usable cached build); None when the cached build will load."""
    if not _uses_deepspeed(environ) or cuda_available or local_processes(environ) <= 1:
        return None
    folder = deepspeed_op_build_dir()
    if _build_lock_held(folder):
        return (
            f"linnaeus: waiting for another process's build of DeepSpeed's CPU communication op in {folder} "
            "(then it is loaded, or built for this environment, ~3 min)"
        )
    if (folder / f"{DS_CPU_COMM_OP}.so").is_file() and _built_for_this_torch(folder):
        return None
    why = "" if not (folder / f"{DS_CPU_COMM_OP}.so").is_file() else " (the cached build is another environment's)"
    return f"linnaeus: building DeepSpeed's CPU communication op (~3 min) in {folder}{why}"


def check_launch(
    environ: MutableMapping[str, str] | None = None,
    cuda_devices: int | None = None,
    cpu_count: int | None = None,
    announce: bool = True,
) -> None:
    """Call first in the training entry point, on every process, before the Accelerator or DeepSpeed exist
    (``linnaeus launch`` also calls it once, with the ranks' environment, before spawning; ``announce=False``).

    Raises ConfigError on the machine's first process and SystemExit(0), printing nothing, on the others."""
    environ = os.environ if environ is None else environ
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cpu_count is None:
        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        resolve_deepspeed_config(environ)  # first: the GPU check reads the DeepSpeed JSON
        problem = launch_problem(environ, cuda_devices, cpu_count)
        if problem is not None:
            raise ConfigError(problem)
    except ConfigError:
        if _first_local_process(environ):
            raise
        # Exit 0, quietly: the launcher fails the job on the first process's non-zero code anyway, and a worker that
        # failed first would make torchrun kill the first process before its one line is printed (and list every
        # killed worker in its failure report).
        raise SystemExit(0) from None
    notice = deepspeed_op_notice(environ, cuda_devices > 0) if announce and _first_local_process(environ) else None
    if notice is not None:
        print(notice, file=sys.stderr, flush=True)
