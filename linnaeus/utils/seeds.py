"""One rule for derived randomness: a seed is a pure function of a tuple of ints, through numpy's ``SeedSequence``.

The data workers' ``np.random.default_rng((seed, epoch, index))`` is this rule (``default_rng`` feeds the tuple to a
``SeedSequence``); ``seed_of`` gives the same kind of seed as an int for a ``torch.Generator``. Unlike CPython's
``hash`` of a tuple it is specified, the same on every Python version and platform, and well mixed.
"""

from __future__ import annotations

import numpy as np

_U64 = 2**64


def rng_of(*keys: int) -> np.random.Generator:
    """A NumPy generator seeded by ``keys`` (each taken modulo 2**64)."""
    return np.random.default_rng(np.random.SeedSequence([k % _U64 for k in keys]))


def seed_of(*keys: int) -> int:
    """A non-negative 63-bit seed derived from ``keys`` (each taken modulo 2**64), e.g. for ``torch.Generator``."""
    state = np.random.SeedSequence([k % _U64 for k in keys]).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) >> 1
