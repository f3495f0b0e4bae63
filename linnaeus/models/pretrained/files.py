"""Read a local weights file into a flat ``{name: tensor}``: safetensors, or a .pth/.pt/.bin state dict.

Pickled files go through ``torch.load(weights_only=True)`` only. Nothing is downloaded: a missing file or a hub
name is one ConfigError saying how to fetch the file on a machine with internet access.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from linnaeus.errors import ConfigError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Common checkpoint wrappers, tried in order (EMA weights first where a checkpoint has both).
WRAPPERS = ("state_dict_ema", "model_ema", "model", "state_dict", "module", "net", "params")


def how_to_get(key: str, value: str) -> str:
    """The fetch hint for a missing file: a hub id gets its download command, anything else the generic one."""
    hub = value.removeprefix("hf-hub:").removeprefix("hf_hub:")
    if "/" in hub and not Path(hub).is_absolute() and not hub.startswith((".", "~")) and hub.count("/") == 1:
        return (
            f"download it on a machine with internet access (`huggingface-cli download {hub} "
            f"model.safetensors --local-dir weights/{hub.split('/')[-1]}`) and set {key} to the local file"
        )
    if "/" not in value and Path(value).suffix not in (".safetensors", *TORCH_SUFFIXES):
        return (
            f"for a timm model, download it on a machine with internet access (`huggingface-cli download "
            f"timm/{value} model.safetensors --local-dir weights/{value}`) and set {key} to the local file"
        )
    return "copy the file to this machine and set the key to its path (nothing is downloaded at run time)"


def _unwrap(obj: object, where: str) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) / 2:
            return tensors
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    raise ConfigError(f"{where}: expected a state dict of tensors (optionally under one of {list(WRAPPERS)})")


def strip_wrapper_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix carried by every key."""
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def read_weights(path: str, key: str) -> dict[str, torch.Tensor]:
    """Tensors of the local weights file ``path`` named by config key ``key`` (for error messages)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}: '{path}' is not a local file; {how_to_get(key, path)}")
    where = f"{key} ({p})"
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return strip_wrapper_prefixes(load_file(str(p)))
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{where}: cannot read safetensors ({err})") from None
    if p.suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"{where}: not a plain tensor state dict, refused by weights_only loading ({reason})"
            ) from None
        return strip_wrapper_prefixes(_unwrap(obj, where))
    raise ConfigError(f"{where}: expected a .safetensors file or a {'/'.join(TORCH_SUFFIXES)} state dict")
