"""Inference: export bundles, the Predictor, hierarchy-consistent decoding and polli-typus output.

Names are imported lazily so ``import linnaeus.inference`` stays cheap (no model code until it is used).
"""

from __future__ import annotations

from linnaeus.utils.lazy import lazy_exports

_EXPORTS = {
    "Bundle": "linnaeus.inference.bundle",
    "export_bundle": "linnaeus.inference.bundle",
    "resolve_weights": "linnaeus.inference.bundle",
    "Predictor": "linnaeus.inference.predictor",
    "evaluate_bundle": "linnaeus.inference.evaluate",
    "Hierarchy": "linnaeus.inference.decoding",
    "Decoded": "linnaeus.inference.decoding",
    "decode": "linnaeus.inference.decoding",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports("linnaeus.inference", _EXPORTS)
