"""Classification heads: one linear classifier per rank, optionally refined top-down by the parent rank.

All heads live in one ``HierarchicalClassifier``. It orders ranks from coarsest to finest by the number in
``taxa_LXX`` (larger = coarser), whatever order the user listed them in, and refines a hierarchical head's logits
with its parent's (already refined) logits:

    z̃_child = z_child + log(π(z̃_parent) · H + eps)

H is the (K_parent, K_child) 0/1 matrix for the adjacent configured ranks. Because the taxonomy is a tree, π · H
just reads each child's parent probability, so it is computed as a gather (exact in any dtype, O(B·K_child)).

Orphans (children with no parent at the previous configured rank: an all-zero column of H, e.g. a species whose
genus is null in every row, or a skip-level edge) get the prior log(1/K_parent): the mean of π over the parent
classes, i.e. the parent probability of an average parent, which is exactly 1/K_parent for any π. It keeps an
orphan on its siblings' scale (no prior, log 1 = 0, would hand it a head start of log K_parent over every
regular child under uninformative logits). See docs/design.md, "Model and loss decisions".
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linnaeus.errors import ConfigError, DataError
from linnaeus.models.registry import get_head_class, register_head
from linnaeus.specs.model import HeadSpec

EPS = 1e-10


def rank_level(task_key: str) -> int:
    """The number in ``taxa_LXX`` (10 species, 20 genus, ...); larger is coarser."""
    digits = task_key.removeprefix("taxa_L")
    if not task_key.startswith("taxa_L") or not digits.isdigit():
        raise ConfigError(f"DATA.TASK_KEYS_H5: expected names like 'taxa_L10', got '{task_key}'")
    return int(digits)


def coarse_to_fine(task_keys: list[str]) -> list[str]:
    return sorted(task_keys, key=rank_level, reverse=True)


@register_head("LinearHead")
class LinearHead(nn.Module):
    """z = W f + b. Ignores the parent rank."""

    conditions_on_parent: ClassVar[bool] = False

    def __init__(self, in_dim: int, num_classes: int, spec: HeadSpec) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes, bias=spec.use_bias)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        if self.fc.bias is not None:
            nn.init.zeros_(self.fc.bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.fc(feature)

    def parent_distribution(self, parent_logits: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} does not condition on a parent rank")


@register_head("HierarchicalSoftmaxHead")
class HierarchicalSoftmaxHead(LinearHead):
    """Base logits plus the log of the parent's softmax probability (matrix refinement, not a path-product HSM)."""

    conditions_on_parent: ClassVar[bool] = True

    def parent_distribution(self, parent_logits: torch.Tensor) -> torch.Tensor:
        return parent_logits.float().softmax(dim=-1)


@register_head("ConditionalClassifier")
class ConditionalClassifier(LinearHead):
    """Like HierarchicalSoftmaxHead, with a routing distribution over parents.

    soft: softmax(z/T). gumbel: a soft Gumbel-softmax sample (τ = T) in training, softmax(z/T) in eval.
    hard: one-hot argmax in eval, softmax(z/T) in training (so gradients still reach the parent).
    """

    conditions_on_parent: ClassVar[bool] = True

    def __init__(self, in_dim: int, num_classes: int, spec: HeadSpec) -> None:
        super().__init__(in_dim, num_classes, spec)
        self.routing = spec.routing
        self.temperature = float(spec.temperature)

    def parent_distribution(self, parent_logits: torch.Tensor) -> torch.Tensor:
        z = parent_logits.float()
        if self.routing == "gumbel" and self.training:
            return F.gumbel_softmax(z, tau=self.temperature, hard=False)
        if self.routing == "hard" and not self.training:
            return F.one_hot(z.argmax(dim=-1), z.shape[-1]).to(z.dtype)
        return (z / self.temperature).softmax(dim=-1)

    def extra_repr(self) -> str:
        return f"routing={self.routing}, temperature={self.temperature}"


def _parent_index(
    parent: str, child: str, matrix: torch.Tensor | np.ndarray, k_parent: int, k_child: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(parent index per child, orphan mask) from a 0/1 (K_parent, K_child) matrix; rejects non-tree matrices."""
    h = torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, torch.Tensor) else matrix).detach().cpu()
    if tuple(h.shape) != (k_parent, k_child):
        raise DataError(
            f"hierarchy ({parent}, {child}): shape {tuple(h.shape)}; expected (K_parent, K_child) = ({k_parent}, {k_child})"
        )
    n_parents = (h != 0).sum(dim=0)
    if bool((n_parents > 1).any()):
        bad = int(torch.nonzero(n_parents > 1)[0, 0])
        raise DataError(
            f"hierarchy ({parent}, {child}): child class {bad} has {int(n_parents[bad])} parents; expected a tree"
        )
    return (h != 0).float().argmax(dim=0), n_parents == 0


class HierarchicalClassifier(nn.Module):
    """Every rank's head in one module; ``forward(feature) -> {task_key: logits}`` in the user's task order."""

    def __init__(
        self,
        in_dim: int,
        task_keys: list[str],
        num_classes: dict[str, int],
        head_specs: dict[str, HeadSpec],
        hierarchy: dict[tuple[str, str], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.task_keys = list(task_keys)
        self.order = coarse_to_fine(self.task_keys)
        self.heads = nn.ModuleDict()
        for key in self.task_keys:
            spec = head_specs[key]
            cls = get_head_class(spec.type, f"MODEL.CLASSIFICATION.HEADS.{key}.TYPE")
            self.heads[key] = cls(in_dim, num_classes[key], spec)
        self.parent_of: dict[str, str] = {}
        self.orphan_prior: dict[str, float] = {}  # log(1 / K_parent) per refined child rank
        hierarchy = hierarchy or {}
        for parent, child in zip(self.order, self.order[1:], strict=False):
            if not self.heads[child].conditions_on_parent:
                continue
            if (parent, child) not in hierarchy:
                raise ConfigError(
                    f"MODEL.CLASSIFICATION.HEADS.{child}.TYPE: {head_specs[child].type} needs the ({parent}, {child}) "
                    "hierarchy matrix; set DATA.TAXONOMY_PATH or use labels from which the hierarchy can be inferred"
                )
            index, orphan = _parent_index(
                parent, child, hierarchy[(parent, child)], num_classes[parent], num_classes[child]
            )
            self.register_buffer(f"parent_index_{child}", index, persistent=False)
            self.register_buffer(f"orphan_{child}", orphan, persistent=False)
            self.orphan_prior[child] = -math.log(num_classes[parent])
            self.parent_of[child] = parent

    def forward(self, feature: torch.Tensor) -> dict[str, torch.Tensor]:
        refined: dict[str, torch.Tensor] = {}
        for key in self.order:
            logits = self.heads[key](feature)
            parent = self.parent_of.get(key)
            if parent is not None:
                pi = self.heads[key].parent_distribution(refined[parent])
                prior = torch.log(pi.index_select(1, getattr(self, f"parent_index_{key}")) + EPS)
                logits = logits.float() + prior.masked_fill(getattr(self, f"orphan_{key}"), self.orphan_prior[key])
            refined[key] = logits
        return {key: refined[key] for key in self.task_keys}
