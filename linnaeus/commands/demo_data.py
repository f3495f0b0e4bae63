"""``linnaeus demo-data``: write the synthetic demo dataset and print what was written."""

from __future__ import annotations

import argparse
from pathlib import Path

from linnaeus.data.demo import write_demo_dataset


def run(args: argparse.Namespace) -> int:
    s = write_demo_dataset(
        Path(args.out),
        seed=args.seed,
        per_species=args.per_species,
        observations=args.observations,
        views=args.views,
    )
    obs = f"; {s['num_observations']} observations ({s['views']} views)" if s["num_observations"] else ""
    print(
        f"demo-data: {s['num_images']} images ({s['num_species']} species, {s['num_genera']} genera, "
        f"{s['num_families']} families; {s['species_nulls']} rows without species, {s['genus_nulls']} without genus{obs}) "
        f"-> {s['images_dir']}, {s['labels']}, {s['taxonomy']}"
    )
    return 0
