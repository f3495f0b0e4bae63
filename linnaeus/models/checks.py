"""One-line ConfigError checks for architecture settings the schema cannot express per field."""

from __future__ import annotations

from collections.abc import Sequence

from linnaeus.errors import ConfigError


def require_len(key: str, values: Sequence, n: int) -> None:
    if len(values) < n:
        raise ConfigError(f"{key}: expected at least {n} values, got {list(values)}")


def require_positive(key: str, values: Sequence, n: int, allow_zero: bool = False) -> None:
    require_len(key, values, n)
    low = 0 if allow_zero else 1
    for v in values[:n]:
        if v < low:
            raise ConfigError(f"{key}: expected values >= {low}, got {list(values)}")


def require_heads_divide(dims_key: str, dims: Sequence[int], heads: Sequence[int], multiple: int = 2) -> None:
    """Each width must split into heads whose size is a multiple of ``multiple`` (RoPE rotates channel pairs)."""
    for dim, h in zip(dims, heads, strict=False):
        if h < 1 or dim % h or (dim // h) % multiple:
            raise ConfigError(
                f"{dims_key}: width {dim} with {h} heads; expected a width divisible by the head count with a "
                f"head size divisible by {multiple}"
            )


def require_stride_multiple(what: str, height: int, width: int, stride: int) -> None:
    """Every downsampling halves the map exactly, so both sides must divide by the backbone's total stride."""
    if height % stride or width % stride:
        raise ConfigError(
            f"{what}: {height}x{width}; expected height and width that are multiples of {stride} (the model's stride)"
        )
