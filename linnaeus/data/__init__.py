"""Data: labels.h5 store, taxonomy, splits, metadata encoders, images, datasets, loaders, shards, demo data.

The common entry point is :func:`prepare_data` (``linnaeus.data.prepare``). Names below are imported lazily, so
``import linnaeus.data.encoders`` (e.g. in a DataLoader worker or at inference) does not pull in h5py.
"""

from __future__ import annotations

from linnaeus.utils.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "labels": ["LabelStore", "ComponentSpec", "FilterReport"],
        "taxonomy": ["ClassMap", "TaxonomyTree"],
        "splits": ["Split", "random_split"],
        "prepare": ["PreparedData", "SplitView", "prepare_data"],
        "stages": ["data_stages", "run_stages"],
        "check": ["build_report"],
        "verify_images": ["verify_images"],
    },
)
