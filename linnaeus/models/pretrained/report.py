"""What a pretrained file gave the model: per group loaded/total, every skipped tensor with its reason.

Sources fill a :class:`Transfer` (target name ← source tensor, or source key skipped with a reason); ``apply``
copies the accepted tensors into the model and returns the :class:`LoadReport` that ``linnaeus check`` prints and
model building logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from linnaeus.errors import ConfigError

GROUPS = ("stem", "stages", "blocks", "norms", "tokens", "meta", "heads", "other")

_NORM = re.compile(r"(^|\.)(norm\w*|bn\d*|ln\w*|fc_norm)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
_TOKEN = re.compile(r"(cls_token|reg_token|mask_token|pos_embed|freqs|relative_position_bias_table|\.table|\.extra)$")


def group_of(name: str) -> str:
    """The report group of a LinnaeusModel state-dict name."""
    if name.startswith("head."):
        return "heads"
    if ".meta_tokens." in name:
        return "meta"
    if _TOKEN.search(name):
        return "tokens"
    if _NORM.search(name):
        return "norms"
    inner = name.removeprefix("backbone.").removeprefix("model.")
    if inner.startswith(("stem", "patch_embed")):
        return "stem"
    if inner.startswith(("conv_stages.", "downsamples.", "stages.", "patch_embeds.")):
        return "stages"
    if inner.startswith(("attn_stages.", "blocks.", "layers.")):
        return "blocks"
    return "other"


@dataclass
class LoadReport:
    """Outcome of one pretrained load. ``totals``/``loaded``: tensors of the model per group."""

    source: str
    files: list[str]
    totals: dict[str, int]
    loaded: dict[str, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source key, reason)
    notes: list[str] = field(default_factory=list)
    # Skips that change what loaded pretrained parts compute (logged as warnings, not INFO).
    warnings: list[str] = field(default_factory=list)

    @property
    def num_loaded(self) -> int:
        return sum(self.loaded.values())

    def left_out(self) -> str:
        """What of the file(s) was left and why, by kind of reason: "12 left out (8 no counterpart, 4 shape)"."""
        if not self.skipped:
            return "nothing left out"
        kinds: dict[str, int] = {}
        for _, reason in self.skipped:
            kind = "shape mismatch" if reason.startswith("shape ") else reason.split(":")[0].split(" (")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        return f"{len(self.skipped)} left out ({', '.join(f'{n} {k}' for k, n in kinds.items())})"

    def lines(self) -> list[str]:
        """The summary line, then warnings (``  warning: ...``), notes and every skipped tensor."""
        groups = ", ".join(f"{g} {self.loaded.get(g, 0)}/{n}" for g, n in self.totals.items() if n)
        out = [f"pretrained ({self.source}, {', '.join(self.files)}): {groups}; {self.left_out()}"]
        out += [f"  warning: {w}" for w in self.warnings]
        out += [f"  {note}" for note in self.notes]
        out += [f"  skipped {key}: {reason}" for key, reason in self.skipped]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "files": self.files,
            "groups": {g: {"loaded": self.loaded.get(g, 0), "total": n} for g, n in self.totals.items() if n},
            "skipped": [{"key": k, "reason": r} for k, r in self.skipped],
            "notes": self.notes,
            "warnings": self.warnings,
        }


class Transfer:
    """Collects target ← tensor assignments for one model, checking names and shapes as they come."""

    def __init__(self, model: nn.Module) -> None:
        self.targets = model.state_dict()
        self.assigned: dict[str, torch.Tensor] = {}
        self.skipped: list[tuple[str, str]] = []
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.assigned_sources: list[str] = []  # source keys whose tensors were accepted

    def assign(self, target: str, source_key: str, tensor: torch.Tensor) -> bool:
        have = self.targets.get(target)
        if have is None:
            self.skipped.append((source_key, f"no counterpart ({target} is not in the model)"))
            return False
        if tuple(have.shape) != tuple(tensor.shape):
            self.skipped.append(
                (source_key, f"shape {tuple(tensor.shape)} vs {target} {tuple(have.shape)} in the model")
            )
            return False
        if target in self.assigned:
            self.skipped.append((source_key, f"{target} already loaded from another tensor"))
            return False
        self.assigned[target] = tensor
        self.assigned_sources.append(source_key)
        return True

    def skip(self, source_key: str, reason: str) -> None:
        self.skipped.append((source_key, reason))

    @torch.no_grad()
    def apply(self, model: nn.Module, source: str, files: list[str], require_any: bool = True) -> LoadReport:
        """Copy the accepted tensors into ``model`` (dtype kept); a load that gives nothing is a ConfigError."""
        totals = dict.fromkeys(GROUPS, 0)
        loaded = dict.fromkeys(GROUPS, 0)
        for name in self.targets:
            totals[group_of(name)] += 1
        if require_any and not self.assigned:
            first = "; ".join(f"{k}: {r}" for k, r in self.skipped[:3]) or "the file holds no tensors"
            raise ConfigError(
                f"MODEL.PRETRAINED ({source}): {', '.join(files)} loads nothing into this model ({first})"
            )
        for name, tensor in self.assigned.items():
            self.targets[name].copy_(tensor.to(self.targets[name].dtype))
            loaded[group_of(name)] += 1
        return LoadReport(source, files, totals, loaded, list(self.skipped), list(self.notes), list(self.warnings))
