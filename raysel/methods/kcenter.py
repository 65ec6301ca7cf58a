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

import numpy as np

from raysel.core.features import FeatureStore, pooled
from raysel.methods.base import Context, Method, MethodConfig, Picks, Pool


class KCenterConfig(MethodConfig):
    name: Literal["kcenter"] = "kcenter"
    pooling: Literal["mean", "sum", "max"] = "mean"  # which pooled SAE vector a sample is
    normalize: bool = True  # L2-normalise each vector: distances compare directions, not lengths


# What pick takes on the driver, measured in a process of its own on a machine otherwise idle (4M to
# 20M stored entries, 40k to 100k rows: 74-87 B an entry all told): the store's table read and sorted
# by id, each entry as a row, a feature and a value (int64, int64, float64), normalised into a second
# value array, and per pick a gather and a product over all of them; the ids as Python strings.
BYTES_PER_STORED = 72
BYTES_PER_ROW = 2000


class KCenter(Method):
    Config = KCenterConfig

    def driver_bytes(self, store: FeatureStore, k: int, ctx: Context) -> int:
        rows, stored = store.counts()  # every stored entry, not just the activated ones
        return BYTES_PER_STORED * stored + BYTES_PER_ROW * rows

    def pick(self, pool: Pool, k: int, ctx: Context) -> Picks:
        column = "feat_max" if self.cfg.pooling == "max" else "feat_sum"
        table = pool.store.table(["id", "n_tokens", "feat_ids", column])
        ids = np.asarray(table["id"].to_pylist(), dtype=object)
        rows, feats, values = sparse_vectors(table, self.cfg.pooling, self.cfg.normalize)
        del table  # the flat arrays are all the walk reads: the store's columns need not stay beside them
        start = int(np.random.default_rng(ctx.seed).integers(len(ids))) if len(ids) else 0
        order, radii = k_center_greedy(rows, feats, values, len(ids), k, start)
        return Picks(
            ids[order].tolist(),
            radii,
            {"radius": float(radii[-1]) if len(radii) else None, "first": str(ids[start]) if len(ids) else None},
        )


def sparse_vectors(table, pooling: str, normalize: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, feature, value) of each sample's pooled vector; unit length when `normalize`."""
    rows, feats, values = pooled(table, pooling)
    if normalize:
        norms = np.sqrt(np.bincount(rows, values * values, minlength=table.num_rows))
        values = values / np.where(norms > 0, norms, 1.0)[rows]
    return rows, feats, values


def k_center_greedy(rows, feats, values, n: int, k: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices in pick order, and each pick's distance to the picks before it (inf for the first)."""
    k = min(k, n)
    if k == 0:
        return np.empty(0, np.int64), np.empty(0)
    d = int(feats.max()) + 1 if feats.size else 1
    sq_norm = np.bincount(rows, values * values, minlength=n)
    nearest = np.full(n, np.inf)  # each sample's squared distance to its nearest pick
    order, radii = np.empty(k, np.int64), np.empty(k)
    pick, radius = start, np.inf
    for i in range(k):
        order[i], radii[i] = pick, radius
        center = np.zeros(d)
        mine = slice(*np.searchsorted(rows, [pick, pick + 1]))  # rows ascend: this sample's entries
        center[feats[mine]] = values[mine]
        dist = sq_norm + sq_norm[pick] - 2 * np.bincount(rows, values * center[feats], minlength=n)
        np.minimum(nearest, np.maximum(dist, 0.0), out=nearest)
        nearest[order[: i + 1]] = -1.0  # picked: never again
        pick = first_of_max(nearest)
        radius = float(np.sqrt(max(nearest[pick], 0.0)))
    return order, radii


def first_of_max(values: np.ndarray, rel: float = 1e-9) -> int:
    """The first index at the maximum, counting as equal what differs only by rounding (unit vectors
    with disjoint features are all exactly sqrt(2) apart; their computed distances are not)."""
    best = values.max()
    return int(np.flatnonzero(values >= best - rel * abs(best))[0])
