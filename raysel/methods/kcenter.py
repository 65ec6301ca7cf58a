"""k-center greedy: the coreset baseline (Sener & Savarese, 2018) over the pooled SAE vectors.

Each pick is the sample farthest from every sample picked so far, so the picks spread over the
pool and the largest distance from any sample to its nearest pick (the covering radius) shrinks
greedily; a 2-approximation of the optimal k-center radius. Vectors are the samples' pooled SAE
activations (mean-pooled by default), L2-normalised unless `normalize: false`.

Vectors are sparse and the picks dense: ||x - c||^2 = ||x||^2 + ||c||^2 - 2 x.c, and x.c for every
x is one pass over the pool's non-zeros. Each pick costs O(nnz), so k picks cost O(k nnz): a
baseline for pools up to a few hundred thousand samples, not a million-row method. The first
pick is a seeded random sample (select.seed); ties, up to rounding, go to the sample of the smallest
seeded hash of its id (select.seed), not to where an id sorts: disjoint unit vectors all tie.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from raysel.core.features import seeded_hash
from raysel.methods.base import Context, Method, MethodConfig, Picks, Pool

if TYPE_CHECKING:
    from raysel.core.features import FeatureStore


class KCenterConfig(MethodConfig):
    """K-center greedy, the standard coreset baseline: each pick the sample farthest from all picks so far (a seeded
    random first). It holds the whole store's pooled vectors on the driver, read a batch at a time into one CSR (an
    int32 feature and a float64 value a stored entry: 1.15 GB for 82k samples of ~975 stored features, measured;
    about 15 GB at a million), so it is a baseline for pools up to a few hundred thousand; the memory check refuses
    more"""

    name: Literal["kcenter"] = "kcenter"
    pooling: Literal["mean", "sum", "max"] = "mean"
    """`mean`, `sum` or `max`: which pooled SAE vector a sample is"""
    normalize: bool = True
    """L2-normalise the vectors"""


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
        from raysel.methods.kcenter_kernel import k_center_greedy, unit_rows  # numba, loaded when it runs

        ids, indptr, feats, values = pool.store.pooled_vectors(self.cfg.pooling)
        if self.cfg.normalize:
            unit_rows(indptr, values)
        start = int(np.random.default_rng(ctx.seed).integers(len(ids))) if len(ids) else 0
        order, radii = k_center_greedy(indptr, feats, values, k, start, seeded_hash(ids, ctx.seed))
        return Picks(
            ids[order].tolist(),
            radii,
            {"radius": float(radii[-1]) if len(radii) else None, "first": str(ids[start]) if len(ids) else None},
        )
