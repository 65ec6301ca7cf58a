"""SAE-GreedSelect: greedy maximum coverage of activated features, lazily.

Each sample x is its activated set A(x) = {j : g_j(x) > tau}, given in CSR form
(indptr, indices). Greedy picks the sample whose not-yet-covered features weigh
the most; ties go to the larger |A(x)|, then to the earlier sample. When no
sample adds anything, coverage is saturated: the covered set is reset and
greedy goes on. Lazy greedy keeps gains as upper bounds (coverage gains only
shrink as C grows) and re-evaluates just the top, so its picks are exactly
those of the naive loop, at a fraction of the work.

The loop is compiled with numba: at a million samples it runs tens of millions
of re-evaluations, each a few dozen lookups, which Python cannot do in time.
Candidates live in two places: rows untouched since the last reset, in one
order sorted once up front (their bound is their full weight), and rows
re-evaluated since, in a binary heap. A reset is then O(1) instead of a new
heap over every remaining row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np


@dataclass
class Selection:
    order: np.ndarray  # row indices, in selection order
    gains: np.ndarray  # each pick's weighted gain, against the coverage at the time
    resets: list[int]  # positions in `order` where coverage had saturated and was reset


def idf_weights(indices: np.ndarray, n: int) -> np.ndarray:
    """log((n + 1) / (df + 1)) + 1, rounded to 1/1024: sums of such weights are exact in float64
    whatever the order they are added in, so equal gains are really equal and ties break by the rule."""
    df = np.bincount(indices, minlength=int(indices.max()) + 1 if indices.size else 1)
    return np.round((np.log((n + 1) / (df + 1)) + 1.0) * 1024) / 1024


def lazy_greedy(indptr: np.ndarray, indices: np.ndarray, budget: int, weights: np.ndarray | None = None) -> Selection:
    n = len(indptr) - 1
    d = int(indices.max()) + 1 if indices.size else 1
    w = np.ones(d) if weights is None else np.asarray(weights, dtype=np.float64)[:d]
    indptr, indices = np.asarray(indptr, np.int64), np.asarray(indices, np.int32)  # 4 bytes a feature: fewer cache lines per row
    sizes = np.diff(indptr)
    totals = np.add.reduceat(w[indices], indptr[:-1]) if indices.size else np.zeros(n)
    totals[sizes == 0] = 0.0  # reduceat repeats the next value for empty rows
    static = np.lexsort((np.arange(n), -sizes, -totals))  # best first: gain, then size, then earlier row
    order, gains, resets = _greedy(indptr, indices, w, totals, static, min(budget, n))
    return Selection(order, gains, resets.tolist())


@numba.njit(cache=True, inline="always")
def _before(key_a, size_a, row_a, key_b, size_b, row_b) -> bool:
    if key_a != key_b:
        return key_a > key_b
    if size_a != size_b:
        return size_a > size_b
    return row_a < row_b


@numba.njit(cache=True)
def _sift_down(hkey, hsize, hrow, m, pos):
    key, size, row = hkey[pos], hsize[pos], hrow[pos]
    while True:
        child = 2 * pos + 1
        if child >= m:
            break
        if child + 1 < m and _before(hkey[child + 1], hsize[child + 1], hrow[child + 1],
                                     hkey[child], hsize[child], hrow[child]):
            child += 1
        if not _before(hkey[child], hsize[child], hrow[child], key, size, row):
            break
        hkey[pos], hsize[pos], hrow[pos] = hkey[child], hsize[child], hrow[child]
        pos = child
    hkey[pos], hsize[pos], hrow[pos] = key, size, row


@numba.njit(cache=True)
def _sift_up(hkey, hsize, hrow, pos):
    key, size, row = hkey[pos], hsize[pos], hrow[pos]
    while pos > 0:
        parent = (pos - 1) // 2
        if not _before(key, size, row, hkey[parent], hsize[parent], hrow[parent]):
            break
        hkey[pos], hsize[pos], hrow[pos] = hkey[parent], hsize[parent], hrow[parent]
        pos = parent
    hkey[pos], hsize[pos], hrow[pos] = key, size, row


@numba.njit(cache=True)
def _live_features(df, w):
    """Features some remaining row still has and that weigh something: while any is uncovered, a gain is positive."""
    live = 0
    for j in range(df.size):
        if df[j] > 0 and w[j] > 0:
            live += 1
    return live


@numba.njit(cache=True)
def _greedy(indptr, indices, w, totals, static, budget):
    n, d = indptr.size - 1, w.size
    sizes = indptr[1:] - indptr[:-1]
    df = np.zeros(d, np.int64)  # remaining (unchosen) rows holding each feature
    for p in range(indices.size):
        df[indices[p]] += 1
    covered = np.zeros(d, np.bool_)
    n_covered = 0
    chosen = np.zeros(n, np.bool_)
    stamp = np.zeros(n, np.int64)  # the pick count at which a row's heap key was computed
    hkey, hsize, hrow = np.empty(n), np.empty(n, np.int64), np.empty(n, np.int64)  # the heap, by column
    order, gains = np.empty(budget, np.int64), np.empty(budget)
    resets = []
    live, m, nxt, picks, epoch_start = _live_features(df, w), 0, 0, 0, 0
    while picks < budget:
        if live == 0 and n_covered > 0:  # no positive gain anywhere: saturated, start over
            resets.append(picks)
            covered[:] = False
            n_covered, live, m, nxt, epoch_start = 0, _live_features(df, w), 0, 0, picks
            continue
        while nxt < n and chosen[static[nxt]]:
            nxt += 1
        # the better of the heap's top and the next untouched row, compared by their bounds
        from_static = nxt < n and (m == 0 or _before(totals[static[nxt]], sizes[static[nxt]], static[nxt],
                                                     hkey[0], hsize[0], hrow[0]))
        row = static[nxt] if from_static else hrow[0]
        fresh = (epoch_start if from_static else stamp[row]) == picks
        if not fresh:  # stale bound: re-evaluate and let it compete again from the heap
            g = 0.0
            for p in range(indptr[row], indptr[row + 1]):
                if not covered[indices[p]]:
                    g += w[indices[p]]
            stamp[row] = picks
            if from_static:
                nxt += 1
                hkey[m], hsize[m], hrow[m] = g, sizes[row], row
                m += 1
                _sift_up(hkey, hsize, hrow, m - 1)
            else:
                hkey[0] = g
                _sift_down(hkey, hsize, hrow, m, 0)
            continue
        if from_static:
            nxt += 1
            g = totals[row]
        else:
            g = hkey[0]
            m -= 1
            hkey[0], hsize[0], hrow[0] = hkey[m], hsize[m], hrow[m]
            _sift_down(hkey, hsize, hrow, m, 0)
        chosen[row] = True
        order[picks], gains[picks] = row, g
        picks += 1
        for p in range(indptr[row], indptr[row + 1]):
            j = indices[p]
            df[j] -= 1
            if not covered[j]:
                covered[j] = True
                n_covered += 1
                if w[j] > 0:
                    live -= 1
    return order, gains, np.array(resets, dtype=np.int64)
