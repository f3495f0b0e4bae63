"""What the launch decides and the experiment config cannot: DeepSpeed's ZeRO stage, a precision fixed by the
launcher, the number of processes.

Read from an accelerate config file (``linnaeus config validate --accelerate-config FILE``, before anything runs) or,
inside a launched process, from the environment ``accelerate launch`` sets. The cross-key rules in
``linnaeus.config.resolve`` use them, so a config that cannot work under its launch is refused before any file is
read, in one place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from linnaeus.checkout import repo_root
from linnaeus.errors import ConfigError
from linnaeus.specs.launch import LaunchFacts

DS_CONFIG_ENV = "ACCELERATE_DEEPSPEED_CONFIG_FILE"

__all__ = ["LaunchFacts", "from_accelerate_config", "from_environment"]


def _deepspeed_json(path: Path, source: str) -> tuple[int, str | None]:
    """(ZeRO stage, precision the JSON switches on explicitly) of a DeepSpeed config file."""
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{source}: cannot read the DeepSpeed config {path} ({err})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{source}: the DeepSpeed config {path} is not a JSON object")
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0) or 0)
    precision = next((n for n in ("bf16", "fp16") if (ds.get(n) or {}).get("enabled") is True), None)
    return stage, precision


def _find(raw: str, near: Path) -> Path:
    """A DeepSpeed JSON path as accelerate configs write it: absolute, relative to the working directory, or
    relative to the Linnaeus checkout (the shipped accelerate_configs/)."""
    path = Path(raw)
    if path.is_absolute() or path.is_file():
        return path
    for base in (near, repo_root()):
        if (base / path).is_file():
            return base / path
    return path


def from_environment(environ: Mapping[str, str] | None = None) -> LaunchFacts:
    """The facts of the launch this process belongs to (plain ``python -m linnaeus.train``: one process, no ZeRO)."""
    env = os.environ if environ is None else environ
    processes = int(env.get("WORLD_SIZE") or 1)
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    facts = {"precision": precision if precision in ("bf16", "fp16") else None, "processes": processes}
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return LaunchFacts(source="the launch", **facts)
    stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or 0)
    raw = env.get(DS_CONFIG_ENV)
    if raw and raw != "none" and Path(raw).is_file():
        stage, from_json = _deepspeed_json(Path(raw), f"accelerate config {DS_CONFIG_ENV}")
        facts["precision"] = from_json or facts["precision"]
    return LaunchFacts(source="the DeepSpeed launch", deepspeed=True, zero_stage=stage, **facts)


def from_accelerate_config(path: str | os.PathLike) -> LaunchFacts:
    """The facts an accelerate config file (``accelerate launch --config_file``) will give its processes."""
    file = Path(path)
    source = f"accelerate config {file}"
    try:
        raw = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{source}: cannot read it ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of accelerate settings")
    processes = int(raw.get("num_processes") or 1) * int(raw.get("num_machines") or 1)
    mixed = str(raw.get("mixed_precision") or "no").lower()
    precision = mixed if mixed in ("bf16", "fp16") else None
    if str(raw.get("distributed_type", "")).upper() != "DEEPSPEED":
        return LaunchFacts(source=source, precision=precision, processes=processes)
    ds = raw.get("deepspeed_config") or {}
    stage = int(ds.get("zero_stage") or 0)
    ds_file = ds.get("deepspeed_config_file")
    if ds_file and ds_file != "none":
        stage, from_json = _deepspeed_json(_find(str(ds_file), Path.cwd()), source)
        precision = from_json or precision
    return LaunchFacts(source=source, deepspeed=True, zero_stage=stage, precision=precision, processes=processes)
