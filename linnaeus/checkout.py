"""Where the shipped files (``configs/``, ``accelerate_configs/``) are: below every layer, so any layer may ask."""

from __future__ import annotations

from pathlib import Path


def repo_root() -> Path:
    """The directory holding ``configs/``: the source checkout, or the current directory for an installed package."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "configs").is_dir() else Path.cwd()
