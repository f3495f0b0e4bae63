"""Per-class loss weights from training label counts (``LOSS.CLASS_WEIGHTING``)."""

from __future__ import annotations

import numpy as np

from linnaeus.config.defaults import ClassWeightingConfig

LOG_BASE = 10.0


def class_weights(counts: np.ndarray, cfg: ClassWeightingConfig) -> np.ndarray | None:
    """Weights w_c from counts n_c (N = Σ n_c), or None for TYPE 'none'.

    smoothing: N / (n_c + SMOOTHING); capping: min(N / n_c, CAP); logarithmic: 1 / (1 + log10(1 + 9 · n_c / N)).
    The result is rescaled so the sample-weighted mean Σ n_c w_c / N is 1: weighting shifts emphasis between
    classes without changing the loss scale (and hence the effective learning rate).
    """
    if cfg.TYPE == "none":
        return None
    n = np.asarray(counts, dtype=np.float64)
    total = n.sum()
    if total <= 0:
        return np.ones_like(n)
    if cfg.TYPE == "smoothing":
        w = total / (n + cfg.SMOOTHING) if cfg.SMOOTHING > 0 else total / np.maximum(n, 1.0)
    elif cfg.TYPE == "capping":
        with np.errstate(divide="ignore"):
            w = np.minimum(np.where(n > 0, total / np.maximum(n, 1e-300), np.inf), cfg.CAP)
    else:
        w = 1.0 / (1.0 + np.log1p((LOG_BASE - 1.0) * n / total) / np.log(LOG_BASE))
    return w * total / float((n * w).sum())
