"""Taxonomy-aware label smoothing: move mass from the true class to its relatives, closer ones getting more."""

from __future__ import annotations

import numpy as np


def taxonomy_smoothing_matrix(distance: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Row i is the target distribution for true class i: 1 − α on i, α spread over j ≠ i ∝ exp(−β · d(i, j)).

    ``distance`` is the (K, K) tree distance in edges through the lowest common ancestor (siblings 2, cousins 4),
    ``inf`` where two classes share no ancestor; those pairs get no mass. A class with no related class spreads
    α uniformly over the others. Every row sums to 1; α = 0 gives the identity (plain cross-entropy).
    """
    d = np.asarray(distance, dtype=np.float64)
    k = d.shape[0]
    if k == 1:
        return np.ones((1, 1))
    related = np.isfinite(d) & ~np.eye(k, dtype=bool)
    u = np.where(related, np.exp(-beta * np.where(related, d, 0.0)), 0.0)
    total = u.sum(axis=1, keepdims=True)
    uniform = np.full((k, k), 1.0 / (k - 1))
    np.fill_diagonal(uniform, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.where(total > 0, u / np.where(total > 0, total, 1.0), uniform)
    matrix = alpha * spread
    matrix[np.diag_indices(k)] = 1.0 - alpha
    return matrix / matrix.sum(axis=1, keepdims=True)
