"""Inference: export bundles, the Predictor, hierarchy-consistent decoding and polli-typus output.

Names are imported lazily so ``import linnaeus.inference`` stays cheap (no model code until it is used).
"""

from __future__ import annotations

from linnaeus.utils.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "bundle": ["Bundle", "export_bundle", "resolve_weights"],
        "predictor": ["Predictor"],
        "evaluate": ["evaluate_bundle"],
        "decoding": ["Hierarchy", "Decoded", "decode"],
    },
)
