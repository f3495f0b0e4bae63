"""Temperature scaling: one temperature per rank, fitted by minimising the NLL of a labelled split.

Scaling happens on all classes before anything is truncated: ``log_softmax(log_probs / T)`` equals
``log_softmax(logits / T)`` (a log-softmax differs from its logits by a per-row constant), so the stored log-probs
can be rescaled exactly. typus' ``apply_temperature_scaling`` renormalises p^(1/T) over the listed top-k candidates
only, which is a different distribution; it is not used.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from linnaeus.inference import eval_metrics as em

METHOD = "temperature_scaling"
T_MIN, T_MAX = 0.05, 20.0  # the bounded search interval; a fit at a bound is reported as such
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def scale(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(z / T) as log-probabilities, from log_softmax(z) over every class."""
    if temperature == 1.0:
        return log_probs
    return torch.log_softmax(log_probs.double() / temperature, dim=1).to(log_probs.dtype)


def scale_all(log_probs: Mapping[str, torch.Tensor], temperatures: Mapping[str, float]) -> dict[str, torch.Tensor]:
    return {k: scale(v, float(temperatures.get(k, 1.0))) for k, v in log_probs.items()}


def _nll(lp: torch.Tensor, y: torch.Tensor, temperature: float) -> float:
    return float(torch.nn.functional.cross_entropy(lp / temperature, y))


def fit_temperature(log_probs: np.ndarray | torch.Tensor, y: np.ndarray, iterations: int = 80) -> float:
    """The T in [0.05, 20] minimising mean NLL of softmax(z / T) on the labelled rows (golden-section search on
    log T; NLL(T) is unimodal in T for a fixed set of logits)."""
    lab = np.asarray(y) >= 0
    lp = torch.as_tensor(np.asarray(log_probs)[lab], dtype=torch.float64)
    t = torch.as_tensor(np.asarray(y)[lab], dtype=torch.int64)
    if len(t) == 0:
        return 1.0
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = _nll(lp, t, math.exp(a)), _nll(lp, t, math.exp(b))
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = _nll(lp, t, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = _nll(lp, t, math.exp(b))
    return float(math.exp((lo + hi) / 2.0))


def set_id(kind: str, fingerprint: str, rows: np.ndarray) -> str:
    """A stable id of a calibration set: the labels' fingerprint and exactly which rows."""
    h = hashlib.sha256(f"{kind}\n{fingerprint}\n".encode())
    h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return f"{kind}:sha256:{h.hexdigest()[:32]}"


def fit(
    log_probs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray], calibration_set_id: str
) -> dict[str, Any]:
    """The calibration document stored in a bundle: per rank T, and NLL / ECE before and after on the same rows."""
    per_rank: dict[str, Any] = {}
    for key, lp in log_probs.items():
        y = np.asarray(targets[key])
        temperature = fit_temperature(lp, y)
        before = np.exp(lp)
        after = scale(torch.as_tensor(lp), temperature).exp().numpy()
        lab = y >= 0
        per_rank[key] = {
            "temperature": temperature,
            "rows": int(lab.sum()),
            "nll_before": em.nll(before, y),
            "nll_after": em.nll(after, y),
            "ece_before": em.calibration(before, y)["ece"],
            "ece_after": em.calibration(after, y)["ece"],
        }
    return {
        "method": METHOD,
        "calibration_set_id": calibration_set_id,
        "temperature_by_rank": {k: v["temperature"] for k, v in per_rank.items()},
        "per_rank": per_rank,
        "search": {"interval": [T_MIN, T_MAX], "objective": "mean NLL of softmax(logits / T) over all classes"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def check_doc(doc: Any, task_keys: list[str], where: str) -> dict[str, float]:
    """The per-rank temperatures of a calibration document, or a one-line DataError naming what is wrong."""
    from linnaeus.errors import DataError

    temps = doc.get("temperature_by_rank") if isinstance(doc, dict) else None
    if not isinstance(temps, dict) or doc.get("method") != METHOD:
        raise DataError(f"{where}: expected {{'method': '{METHOD}', 'temperature_by_rank': {{task key: T}}, ...}}")
    out = {}
    for key in task_keys:
        t = temps.get(key)
        if not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
            raise DataError(f"{where}: temperature_by_rank.{key} must be a positive number, got {t!r}")
        out[key] = float(t)
    return out
