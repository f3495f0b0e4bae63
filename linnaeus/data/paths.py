"""Where the data lives: config paths, labels paths, and image paths that never leave ``DATA.HYBRID.IMAGES_DIR``.

Every image path the package opens (``check``, training, ``linnaeus shard``) is built by
:func:`resolve_image_paths`, so the containment rule exists once:

- an identifier (with FILE_EXTENSION added) must be a relative path that stays inside IMAGES_DIR: absolute
  identifiers, ``..`` escapes and NUL bytes are refused, whatever is on disk;
- a symbolic link on the way (a sub-folder or the file itself) must resolve inside IMAGES_DIR too, unless
  ``DATA.HYBRID.ALLOW_SYMLINKS_OUTSIDE`` is True (for image folders assembled from links into other disks).
  IMAGES_DIR itself may be a link. The link check reads each distinct folder once (``os.scandir``) rather than
  stat-ing every file, so it stays cheap on millions of images; missing folders are left to the image check.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from linnaeus.errors import ConfigError, clip
from linnaeus.specs.data import ImageSpec, LabelsSpec

# Suffixes that mark an identifier as already carrying its file extension (FILE_EXTENSION is then not added).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
IMAGES_DIR_UNSET = "DATA.HYBRID.IMAGES_DIR: not set; expected the folder holding the images"


def resolve_path(value: str | os.PathLike) -> Path:
    """Config paths: ``~`` expanded; relative paths are taken from the current working directory."""
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else Path.cwd() / path


def label_paths(labels: LabelsSpec) -> tuple[Path, Path | None]:
    """(labels path, None) for one file split by seed, or (train path, val path) for pre-split data."""
    train, val, one = labels.train_labels_path, labels.val_labels_path, labels.labels_path
    if train and val:
        if one:
            raise ConfigError(
                "DATA.H5.LABELS_PATH: set either LABELS_PATH (split by seed) or TRAIN_LABELS_PATH + VAL_LABELS_PATH"
                " (pre-split), not both"
            )
        return resolve_path(train), resolve_path(val)
    if train or val:
        raise ConfigError("DATA.H5.VAL_LABELS_PATH: pre-split data needs both TRAIN_LABELS_PATH and VAL_LABELS_PATH")
    if not one:
        raise ConfigError("DATA.H5.LABELS_PATH: not set; expected the path of your labels.h5")
    return resolve_path(one), None


def images_dir_problem(images: ImageSpec) -> str | None:
    """Why ``DATA.HYBRID.IMAGES_DIR`` cannot serve images (unset, or not a folder), or None."""
    if not images.images_dir:
        return IMAGES_DIR_UNSET
    images_dir = resolve_path(images.images_dir)
    if not images_dir.is_dir():
        return f"DATA.HYBRID.IMAGES_DIR: {images_dir} is not a directory"
    return None


def with_extension(identifier: str, extension: str) -> str:
    """The identifier + FILE_EXTENSION, unless it already ends in an image extension (or that extension)."""
    suffix = os.path.splitext(identifier)[1].lower()
    if extension and suffix not in IMAGE_SUFFIXES and suffix != extension.lower():
        return identifier + extension
    return identifier


def image_path(images_dir: str, identifier: str, extension: str) -> str:
    """IMAGES_DIR / identifier (+ FILE_EXTENSION): the join only; :func:`resolve_image_paths` adds the checks."""
    return os.path.join(images_dir, with_extension(identifier, extension))


def escape_problem(relative: str) -> str | None:
    """Why a relative image path would read outside its folder by its text alone (None when it stays inside)."""
    if "\0" in relative:
        return "contains a NUL byte"
    if os.path.isabs(relative):
        return "is an absolute path; identifiers must be relative to DATA.HYBRID.IMAGES_DIR"
    if ".." not in relative:
        return None
    normal = os.path.normpath(relative)
    if normal == ".." or normal.startswith(".." + os.sep):
        return "leads outside DATA.HYBRID.IMAGES_DIR through '..'"
    return None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def link_escapes(images_dir: str, relatives: Sequence[str]) -> dict[int, str]:
    """{index: where it leads} for relative paths that a symbolic link takes outside ``images_dir``."""
    root = os.path.realpath(images_dir)
    by_folder: dict[str, list[int]] = {}
    for i, rel in enumerate(relatives):
        by_folder.setdefault(os.path.dirname(rel), []).append(i)
    out: dict[int, str] = {}
    for folder, indices in by_folder.items():
        real_folder = os.path.realpath(os.path.join(root, folder))  # follows links, then '..', as open() would
        if not _inside(real_folder, root):
            out.update((i, real_folder) for i in indices)
            continue
        try:
            with os.scandir(real_folder) as entries:
                links = {e.name for e in entries if e.is_symlink()}
        except OSError:
            continue  # a missing folder: its images are reported missing by the image check
        for i in indices:
            name = os.path.basename(relatives[i])
            if name in links:
                target = os.path.realpath(os.path.join(real_folder, name))
                if not _inside(target, root):
                    out[i] = target
    return out


def resolve_image_paths(
    images_dir: str | os.PathLike,
    identifiers: Sequence[str],
    rows: np.ndarray,
    extension: str,
    *,
    labels_path: str | os.PathLike,
    allow_symlinks_outside: bool = False,
) -> tuple[list[str], dict[int, str]]:
    """(image paths, refused): one path per identifier, and {index: one line} for each one that leaves the folder.

    ``rows`` are the labels.h5 rows of ``identifiers``, named in the lines with ``labels_path``. A refused path
    must not be opened.
    """
    images_dir = str(images_dir)
    relatives = [with_extension(str(i), extension) for i in identifiers]
    refused: dict[int, str] = {}

    def refuse(j: int, why: str) -> None:
        refused[j] = f"{labels_path} row {int(rows[j])}: img_identifiers entry {clip(repr(identifiers[j]))} {why}"

    for j, rel in enumerate(relatives):
        why = escape_problem(rel)
        if why:
            refuse(j, why)
    if not allow_symlinks_outside:
        inside = [j for j in range(len(relatives)) if j not in refused]
        for k, target in link_escapes(images_dir, [relatives[j] for j in inside]).items():
            refuse(
                inside[k],
                f"leads through a symbolic link to {target}, outside DATA.HYBRID.IMAGES_DIR {images_dir}; set"
                " DATA.HYBRID.ALLOW_SYMLINKS_OUTSIDE True to allow links out of the image folder",
            )
    return [os.path.join(images_dir, rel) for rel in relatives], dict(sorted(refused.items()))


__all__ = [
    "IMAGES_DIR_UNSET",
    "IMAGE_SUFFIXES",
    "escape_problem",
    "image_path",
    "images_dir_problem",
    "label_paths",
    "link_escapes",
    "resolve_image_paths",
    "resolve_path",
    "with_extension",
]
