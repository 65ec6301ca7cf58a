"""SAE-GreedSelect: greedy maximum coverage of activated features, lazily.

Each sample x is its activated set A(x) = {j : g_j(x) > tau}, given in CSR form
(indptr, indices). Greedy picks the sample whose not-yet-covered features weigh
the most; ties go to the larger |A(x)|, then to the earlier sample. When no
sample adds anything, coverage is saturated: the covered set is reset and
greedy goes on. Lazy greedy keeps gains in a heap as upper bounds (coverage
gains only shrink as C grows) and re-evaluates just the top, so its picks are
exactly those of the naive loop, at a fraction of the work."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass
class Selection:
    order: np.ndarray  # row indices, in selection order
    gains: np.ndarray  # each pick's weighted gain, against the coverage at the time
    resets: list[int]  # positions in `order` where coverage had saturated and was reset


def lazy_greedy(indptr: np.ndarray, indices: np.ndarray, budget: int, weights: np.ndarray | None = None) -> Selection:
    n = len(indptr) - 1
    d = int(indices.max()) + 1 if indices.size else 1
    w = np.ones(d) if weights is None else np.asarray(weights, dtype=np.float64)
    sizes = np.diff(indptr)
    covered = np.zeros(d, dtype=bool)
    chosen = np.zeros(n, dtype=bool)
    order, gains, resets = [], [], []

    def gain(i: int) -> float:
        feats = indices[indptr[i]: indptr[i + 1]]
        return float(w[feats[~covered[feats]]].sum())

    def full_heap() -> list:
        # entries: (-gain, -|A(x)|, row, epoch the gain was computed in)
        # the same arithmetic as gain(), so ties break as in the naive loop
        totals = sizes.astype(float) if weights is None else [gain(i) for i in range(n)]
        heap = [(-float(totals[i]), -int(sizes[i]), i, 0) for i in np.flatnonzero(~chosen)]
        heapq.heapify(heap)
        return heap

    heap, epoch = full_heap(), 0
    while len(order) < min(budget, n):
        neg_gain, neg_size, i, seen = heapq.heappop(heap)
        if seen != epoch:  # stale: re-evaluate and let it compete again
            heapq.heappush(heap, (-gain(i), neg_size, i, epoch))
            continue
        if neg_gain == 0 and covered.any():  # nothing adds coverage: saturated, start over
            resets.append(len(order))
            covered[:] = False
            heap, epoch = full_heap(), 0
            continue
        chosen[i] = True
        covered[indices[indptr[i]: indptr[i + 1]]] = True
        order.append(i)
        gains.append(-neg_gain)
        epoch += 1
    return Selection(np.array(order, dtype=np.int64), np.array(gains), resets)
