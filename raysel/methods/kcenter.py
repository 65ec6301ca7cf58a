"""k-center greedy: the coreset baseline (Sener & Savarese, 2018) over the pooled SAE vectors.

Each pick is the sample farthest from every sample picked so far, so the picks spread over the
pool and the largest distance from any sample to its nearest pick (the covering radius) shrinks
greedily; a 2-approximation of the optimal k-center radius. Vectors are the samples' pooled SAE
activations (mean-pooled by default), L2-normalised unless `normalize: false`.

Vectors are sparse and the picks dense: ||x - c||^2 = ||x||^2 + ||c||^2 - 2 x.c, and x.c for every
x is one pass over the pool's non-zeros. Each pick costs O(nnz), so k picks cost O(k nnz): a
baseline for pools up to a few hundred thousand samples, not a million-row method. The first
pick is a seeded random sample (select.seed); ties, up to rounding, go to the earlier id.
"""

from __future__ import annotations

from typing import Literal

import numba
import numpy as np

from raysel.core.features import FeatureStore
from raysel.methods.base import Context, Method, MethodConfig, Picks, Pool


class KCenterConfig(MethodConfig):
    name: Literal["kcenter"] = "kcenter"
    pooling: Literal["mean", "sum", "max"] = "mean"  # which pooled SAE vector a sample is
    normalize: bool = True  # L2-normalise each vector: distances compare directions, not lengths


# What pick holds on the driver: each stored entry once (an int32 feature, a float64 value; the store is
# read a batch at a time, FeatureStore.pooled_vectors), and per row the id as a Python string, offsets,
# norms and distances. Measured at 81,920 rows of 975 stored entries: 1.15 GB over the process start,
# 15.1 B an entry all told (a7e0585's table-based read: 4.0 GB).
BYTES_PER_STORED = 15
BYTES_PER_ROW = 300


class KCenter(Method):
    Config = KCenterConfig

    def driver_bytes(self, store: FeatureStore, k: int, ctx: Context) -> int:
        rows, stored = store.counts()  # every stored entry, not just the activated ones
        return BYTES_PER_STORED * stored + BYTES_PER_ROW * rows

    def pick(self, pool: Pool, k: int, ctx: Context) -> Picks:
        ids, indptr, feats, values = pool.store.pooled_vectors(self.cfg.pooling)
        if self.cfg.normalize:
            unit_rows(indptr, values)
        start = int(np.random.default_rng(ctx.seed).integers(len(ids))) if len(ids) else 0
        order, radii = k_center_greedy(indptr, feats, values, k, start)
        return Picks(
            ids[order].tolist(),
            radii,
            {"radius": float(radii[-1]) if len(radii) else None, "first": str(ids[start]) if len(ids) else None},
        )


@numba.njit(cache=True, parallel=True)
def unit_rows(indptr, values):
    """Each CSR row scaled to unit length, in place (an empty row stays empty)."""
    norms = np.sqrt(_sq_norms(indptr, values))
    for r in numba.prange(indptr.size - 1):
        if norms[r] > 0:
            values[indptr[r] : indptr[r + 1]] /= norms[r]


def k_center_greedy(indptr, feats, values, k: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices in pick order, and each pick's distance to the picks before it (inf for the first)."""
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
        pick = first_of_max(nearest)
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


def first_of_max(values: np.ndarray, rel: float = 1e-9) -> int:
    """The first index at the maximum, counting as equal what differs only by rounding (unit vectors
    with disjoint features are all exactly sqrt(2) apart; their computed distances are not)."""
    best = values.max()
    return int(np.flatnonzero(values >= best - rel * abs(best))[0])
