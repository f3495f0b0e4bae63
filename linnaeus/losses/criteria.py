"""Per-rank criteria. Each turns targets into a per-class target distribution; the loss is soft-target CE.

Hard labels and mixed (Mixup/CutMix) soft targets go through the same smoothing, so a mixed target is smoothed
exactly as the mixture of its smoothed components.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linnaeus.errors import ConfigError
from linnaeus.losses.smoothing import taxonomy_smoothing_matrix
from linnaeus.registry import LOSSES


def register_criterion(name: str) -> Callable[[type[Criterion]], type[Criterion]]:
    """Class decorator: make a criterion usable as ``HEADS.<task>.LOSS.TYPE: <name>``."""
    return LOSSES.register(name)


def get_criterion_class(name: str, key: str) -> type[Criterion]:
    return LOSSES.get(name, key)


def list_criteria() -> list[str]:
    return LOSSES.names()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample −Σ_c target_c · log softmax(logits)_c, shape (B,)."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def _number(key: str, params: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(f"{key}.{name}: expected a number in [{low}, {high}], got {value!r}")
    return float(value)


def _check_params(key: str, params: dict[str, Any], allowed: set[str]) -> None:
    for name in params:
        if name not in allowed:
            hint = ""
            if name == "label_smoothing" and "alpha" in allowed:
                hint = " (TaxonomyAwareLabelSmoothing's smoothing strength is 'alpha')"
            raise ConfigError(f"{key}.{name}: unknown parameter{hint}; expected one of {sorted(allowed)}")


def validate_loss_params(loss_type: str, params: dict[str, Any], key: str) -> dict[str, Any]:
    """The one validation of ``HEADS.<task>.LOSS`` that training and `linnaeus check` share (ConfigError if bad).

    ``key`` is the head's LOSS prefix, e.g. ``MODEL.CLASSIFICATION.HEADS.taxa_L10.LOSS``.
    """
    return get_criterion_class(loss_type, f"{key}.TYPE").parse_params(params, f"{key}.PARAMS")


class Criterion(nn.Module):
    """Base: ``hard(y) / soft(t) -> target distribution (B, K)``; ``parse_params`` validates ``LOSS.PARAMS``.

    Subclasses are built as ``cls(num_classes, params, key, distance)``; ``distance`` is the task's (K, K)
    taxonomy distance matrix, computed only for criteria that set ``needs_distance``.
    """

    needs_distance: ClassVar[bool] = False

    @staticmethod
    def parse_params(params: dict[str, Any], key: str) -> dict[str, Any]:
        """Validate ``LOSS.PARAMS`` (ConfigError naming ``key.<param>``); `linnaeus check` and training both call
        it. Criteria with parameters override it; the default accepts them as given."""
        return dict(params)

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def hard(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def soft(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_criterion("CrossEntropyLoss")
class CrossEntropyCriterion(Criterion):
    """Cross-entropy with label smoothing ε in timm's / PyTorch's convention: target (1 − ε)·onehot + ε/K.

    (So the true class keeps 1 − ε + ε/K; the prior system's ε/(K − 1) variant is not used.)
    """

    @staticmethod
    def parse_params(params: dict[str, Any], key: str) -> dict[str, float]:
        _check_params(key, params, {"label_smoothing"})
        return {"label_smoothing": _number(key, params, "label_smoothing", 0.0, 0.0, 1.0)}

    def __init__(self, num_classes: int, params: dict[str, Any], key: str, distance: np.ndarray | None = None) -> None:
        super().__init__(num_classes)
        self.eps = self.parse_params(params, key)["label_smoothing"]

    def hard(self, y: torch.Tensor) -> torch.Tensor:
        return self.soft(F.one_hot(y, self.num_classes).float())

    def soft(self, t: torch.Tensor) -> torch.Tensor:
        return t * (1.0 - self.eps) + self.eps / self.num_classes if self.eps else t


@register_criterion("TaxonomyAwareLabelSmoothing")
class TaxonomyAwareCriterion(Criterion):
    """Targets are rows of the smoothing matrix S (see ``taxonomy_smoothing_matrix``); soft targets become t · S."""

    needs_distance = True

    @staticmethod
    def parse_params(params: dict[str, Any], key: str) -> dict[str, float]:
        _check_params(key, params, {"alpha", "beta"})
        return {
            "alpha": _number(key, params, "alpha", 0.1, 0.0, 1.0),
            "beta": _number(key, params, "beta", 1.0, 0.0, float("inf")),
        }

    def __init__(self, num_classes: int, params: dict[str, Any], key: str, distance: np.ndarray | None = None) -> None:
        super().__init__(num_classes)
        parsed = self.parse_params(params, key)
        self.alpha, self.beta = parsed["alpha"], parsed["beta"]
        if distance is None:
            head = key.removesuffix(".LOSS.PARAMS")
            raise ConfigError(
                f"{head}.LOSS.TYPE: TaxonomyAwareLabelSmoothing needs the taxonomy's distance matrix; set "
                "DATA.TAXONOMY_PATH or use labels from which the hierarchy can be inferred"
            )
        matrix = taxonomy_smoothing_matrix(distance, self.alpha, self.beta)
        self.register_buffer("matrix", torch.as_tensor(matrix, dtype=torch.float32), persistent=False)

    def hard(self, y: torch.Tensor) -> torch.Tensor:
        return self.matrix.index_select(0, y)

    def soft(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() @ self.matrix
