"""The feature store's one numba kernel, apart so that reading a config never loads numba."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def counts(indices, d):
    """How many entries hold each feature 0..d-1, without np.bincount's int64 copy of the entries."""
    out = np.zeros(d, np.int64)
    for j in indices:
        out[j] += 1
    return out
