"""Per-class loss weights from training label counts (``LOSS.CLASS_WEIGHTING``)."""

from __future__ import annotations

import numpy as np

from linnaeus.specs.model import ClassWeightingSpec

LOG_BASE = 10.0


def class_weights(counts: np.ndarray, spec: ClassWeightingSpec) -> np.ndarray | None:
    """Weights w_c from counts n_c (N = Σ n_c), or None for TYPE 'none'.

    smoothing: N / (n_c + smoothing); capping: min(N / n_c, cap); logarithmic: 1 / (1 + log10(1 + 9 · n_c / N)).
    The result is rescaled so the sample-weighted mean Σ n_c w_c / N is 1: weighting shifts emphasis between
    classes without changing the loss scale (and hence the effective learning rate).
    """
    if spec.type == "none":
        return None
    n = np.asarray(counts, dtype=np.float64)
    total = n.sum()
    if total <= 0:
        return np.ones_like(n)
    if spec.type == "smoothing":
        w = total / (n + spec.smoothing) if spec.smoothing > 0 else total / np.maximum(n, 1.0)
    elif spec.type == "capping":
        with np.errstate(divide="ignore"):
            w = np.minimum(np.where(n > 0, total / np.maximum(n, 1e-300), np.inf), spec.cap)
    else:
        w = 1.0 / (1.0 + np.log1p((LOG_BASE - 1.0) * n / total) / np.log(LOG_BASE))
    return w * total / float((n * w).sum())
