"""Data rules as values: each rule is one function that returns its problems (one line each).

Training (:func:`linnaeus.data.prepare.prepare_data`) raises the first problem with :func:`raise_first`;
``linnaeus check`` (:func:`linnaeus.data.check.build_report`) lists them all. So a rule is written once and the
two can never disagree. Rules that live beside the data they read, with the same shape:

- labels.h5 schema and values (including encoded metadata outside the encoders' range):
  :func:`linnaeus.data.labels.inspect_labels`;
- identifiers that leave the image folder: :func:`linnaeus.data.paths.resolve_image_paths`;
- missing/corrupt images: :func:`linnaeus.data.verify_images.verify_images` (its report's ``error``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from linnaeus.errors import ConfigError, DataError, LinnaeusError
from linnaeus.specs.data import ImageSpec, LabelsSpec

if TYPE_CHECKING:
    from linnaeus.data.splits import Split
    from linnaeus.data.taxonomy import ClassMap


@dataclass(frozen=True)
class Problem:
    """One line that says what is wrong and where; ``error`` is the exception training raises for it."""

    text: str
    error: type[LinnaeusError] = DataError

    def __str__(self) -> str:
        return self.text


def raise_first(problems: Sequence[Problem | str], hint: str = "") -> None:
    """Raise the first problem (plain strings are DataErrors), saying how many more there are."""
    if not problems:
        return
    first = problems[0]
    error = first.error if isinstance(first, Problem) else DataError
    more = f" (+{len(problems) - 1} more problems; `linnaeus check` lists them all)" if len(problems) > 1 else ""
    raise error(f"{first}{more}" + (f"; {hint}" if hint else ""))


def storage_problems(images: ImageSpec) -> list[Problem]:
    """Images are files under IMAGES_DIR; the prior trainer's images-inside-HDF5 mode is not supported."""
    if images.use_hybrid:
        return []
    return [
        Problem(
            "DATA.HYBRID.USE_HYBRID: False means images stored inside the HDF5 file, which Linnaeus does not read;"
            " keep it True and set DATA.HYBRID.IMAGES_DIR to the folder of image files",
            ConfigError,
        )
    ]


def task_key_problems(task_keys: Sequence[str]) -> list[Problem]:
    """Every DATA.TASK_KEYS_H5 entry must name a polli-typus rank level."""
    from linnaeus.data.taxonomy import rank_of_key

    problems = []
    for key in task_keys:
        try:
            rank_of_key(key)
        except ConfigError as exc:
            problems.append(Problem(str(exc), ConfigError))
    return problems


def split_problems(split: Split) -> list[Problem]:
    """Both splits need rows: training learns from one and validates (and picks the best weights) on the other."""
    problems = []
    if not len(split.train_rows):
        problems.append(
            Problem(
                "the training split is empty: no labels.h5 rows are left for training after the filters and the split"
                " (see DATA.IN_REGION_ONLY, DATA.REQUIRE_ALL_RANKS, DATA.META.COMPONENTS.*.ALLOW_MISSING,"
                " DATA.H5.TRAIN_VAL_SPLIT_RATIO)"
            )
        )
    if not len(split.val_rows):
        how = f"DATA.H5.TRAIN_VAL_SPLIT_RATIO {split.ratio} leaves no rows for it"
        if split.presplit:
            how = "the validation file has no rows after the filters"
        problems.append(Problem(f"the validation split is empty ({how}); validation needs at least one row"))
    return problems


def num_classes_problems(labels: LabelsSpec, class_maps: Mapping[str, ClassMap], where: str) -> list[Problem]:
    """Configured NUM_CLASSES / NUM_CLASSES_PER_LEVEL that disagree with the data."""
    problems = []
    for key, cmap in class_maps.items():
        for name, value in labels.configured(key):
            if value != len(cmap):
                problems.append(
                    Problem(
                        f"{name} is {value} but {where} has {len(cmap)} distinct non-null {key} ids in the rows in"
                        " use (after filters); set it to that number or leave it out to infer it",
                        ConfigError,
                    )
                )
    return problems


def empty_rank_problems(class_maps: Mapping[str, ClassMap], where: str) -> list[Problem]:
    """A configured rank without a single labelled row in use has nothing to learn."""
    return [
        Problem(f"{where}: {key} has no non-null taxon ids in the rows in use; nothing to train at that rank")
        for key, cmap in class_maps.items()
        if not len(cmap)
    ]


__all__ = [
    "Problem",
    "empty_rank_problems",
    "num_classes_problems",
    "raise_first",
    "split_problems",
    "storage_problems",
    "task_key_problems",
]
