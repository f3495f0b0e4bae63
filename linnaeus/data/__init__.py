"""Data: labels.h5 store, taxonomy, splits, metadata encoders, images, datasets, loaders, shards, demo data.

The common entry point is :func:`prepare_data` (``linnaeus.data.prepare``). Names below are imported lazily, so
``import linnaeus.data.encoders`` (e.g. in a DataLoader worker or at inference) does not pull in h5py.
"""

from __future__ import annotations

from linnaeus.utils.lazy import lazy_exports

_EXPORTS = {
    "LabelStore": "linnaeus.data.labels",
    "ComponentSpec": "linnaeus.data.labels",
    "FilterReport": "linnaeus.data.labels",
    "ClassMap": "linnaeus.data.taxonomy",
    "TaxonomyTree": "linnaeus.data.taxonomy",
    "Split": "linnaeus.data.splits",
    "random_split": "linnaeus.data.splits",
    "PreparedData": "linnaeus.data.prepare",
    "SplitView": "linnaeus.data.prepare",
    "prepare_data": "linnaeus.data.prepare",
    "build_report": "linnaeus.data.check",
    "verify_images": "linnaeus.data.verify_images",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports("linnaeus.data", _EXPORTS)
