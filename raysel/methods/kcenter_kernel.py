"""k-center greedy's kernels (numba): unit rows, the greedy itself, and the rounding-aware argmax."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, parallel=True)
def unit_rows(indptr, values):
    """Each CSR row scaled to unit length, in place (an empty row stays empty)."""
    norms = np.sqrt(_sq_norms(indptr, values))
    for r in numba.prange(indptr.size - 1):
        if norms[r] > 0:
            values[indptr[r] : indptr[r + 1]] /= norms[r]


def k_center_greedy(indptr, feats, values, k: int, start: int, tie=None) -> tuple[np.ndarray, np.ndarray]:
    """Row indices in pick order, and each pick's distance to the picks before it (inf for the first);
    a tie goes to the row of the smallest `tie` (the ids' seeded hash; None: the earlier row)."""
    n = indptr.size - 1
    k = min(k, n)
    if k == 0:
        return np.empty(0, np.int64), np.empty(0)
    center = np.zeros(int(feats.max()) + 1 if feats.size else 1)  # the pick, dense; zeroed again after
    sq_norm = _sq_norms(indptr, values)
    nearest = np.full(n, np.inf)  # each sample's squared distance to its nearest pick
    order, radii = np.empty(k, np.int64), np.empty(k)
    pick, radius = start, np.inf
    for i in range(k):
        order[i], radii[i] = pick, radius
        mine = slice(indptr[pick], indptr[pick + 1])
        center[feats[mine]] = values[mine]
        _nearer(indptr, feats, values, center, sq_norm, pick, nearest)
        center[feats[mine]] = 0.0
        nearest[order[: i + 1]] = -1.0  # picked: never again
        pick = first_of_max(nearest, tie)
        radius = float(np.sqrt(max(nearest[pick], 0.0)))
    return order, radii


@numba.njit(cache=True, parallel=True)
def _sq_norms(indptr, values):
    out = np.empty(indptr.size - 1)
    for r in numba.prange(indptr.size - 1):
        out[r] = np.sum(values[indptr[r] : indptr[r + 1]] ** 2)
    return out


@numba.njit(cache=True, parallel=True)
def _nearer(indptr, feats, values, center, sq_norm, pick, nearest):
    """nearest = min(nearest, ||x - center||^2) for every row x, the center being row `pick`."""
    for r in numba.prange(indptr.size - 1):
        dot = 0.0
        for e in range(indptr[r], indptr[r + 1]):
            dot += values[e] * center[feats[e]]
        nearest[r] = min(nearest[r], max(sq_norm[r] + sq_norm[pick] - 2.0 * dot, 0.0))


def first_of_max(values: np.ndarray, tie: np.ndarray | None = None, rel: float = 1e-9) -> int:
    """The index at the maximum, counting as equal what differs only by rounding (unit vectors with
    disjoint features are all exactly sqrt(2) apart; their computed distances are not); of several,
    the one of the smallest `tie`, or the first when None."""
    best = values.max()
    at = np.flatnonzero(values >= best - rel * abs(best))
    return int(at[0] if tie is None else at[np.argmin(tie[at])])
