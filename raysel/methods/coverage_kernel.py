"""SAE-GreedSelect: greedy maximum coverage of activated features.

Each sample x is its activated set A(x) = {j : g_j(x) > tau}, given in CSR form
(indptr, indices). Greedy picks the sample whose not-yet-covered features weigh
the most; ties go to the larger |A(x)|, then to the earlier sample (`seeded_coverage`
visits the samples in the order of a seeded hash of their ids, so no id's spelling wins
ties). When no
sample adds anything, coverage is saturated: the covered set is reset and
greedy goes on.

At a million samples and a budget of 100k, coverage saturates hundreds of
times, and after every reset each remaining sample's gain must come down from
its full weight again. Classic lazy greedy (a heap of stale upper bounds)
re-evaluates every sample several times per epoch at heap cost; here gains are
kept exact instead: covering feature j subtracts w_j from the gain of each
remaining sample that holds it, walking j's postings (an inverted index built
once). That is one pass over the remaining non-zeros per epoch, the floor for
an exact greedy, and the two halves of the rows are updated by two threads.

The best sample is found through blocks of 1024 rows, each holding its max
(gain, size) and how many rows reach it. A block whose max rows all dropped is
only an upper bound until rescanned; blocks are rescanned lazily, when they
come out on top, so a pick costs a scan of the block maxima plus a few blocks.

Gains are integers in units of 1/1024 of a weight, so sums are exact and equal
gains really tie.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from raysel.core.features import document_frequency, seeded_hash

UNIT = 1024  # weights are counted in 1/UNIT steps
SHIFT = 10  # rows per block: 1 << SHIFT


@dataclass
class Selection:
    order: np.ndarray  # row indices, in selection order
    gains: np.ndarray  # each pick's weighted gain, against the coverage at the time
    resets: list[int]  # positions in `order` where coverage had saturated and was reset


def idf_weights(indices: np.ndarray, n: int) -> np.ndarray:
    """log((n + 1) / (df + 1)) + 1, rounded to 1/1024 so the greedy can count it exactly."""
    df = document_frequency(indices)
    return np.round((np.log((n + 1) / (df + 1)) + 1.0) * UNIT) / UNIT


# What seeded_coverage holds beside its CSR: the CSR in hash order and the inverted index (an int32
# row an entry each), and per row its total and gain (float64, int32, int32), block counters, the
# hash order and the permuted indptr. Measured: 344 MB over the CSR for 1M rows of 64 entries before
# the hash order (4 B an entry and 88 B a row), 256 MB and 24 MB more with it.
BYTES_PER_ENTRY = 8
BYTES_PER_ROW = 114


def working_bytes(rows: int, entries: int) -> int:
    return BYTES_PER_ENTRY * entries + BYTES_PER_ROW * rows


def seeded_coverage(
    ids: np.ndarray, indptr: np.ndarray, indices: np.ndarray, budget: int, seed: int, weights: np.ndarray | None = None
) -> Selection:
    """greedy_coverage with its last tie broken by a seeded hash of the ids (select.seed), not by where
    an id sorts: the rows are handed over in hash order and the picks mapped back."""
    order = np.argsort(seeded_hash(ids, seed), kind="stable")
    chosen = greedy_coverage(*_permuted(np.asarray(indptr, np.int64), np.asarray(indices, np.int32), order),
                             budget, weights)  # fmt: skip
    return Selection(order[chosen.order], chosen.gains, chosen.resets)


@numba.njit(cache=True)
def _permuted(indptr, indices, order):
    """The CSR of rows `order` of (indptr, indices), in that order."""
    out_ptr = np.zeros(len(order) + 1, np.int64)
    for i in range(len(order)):
        out_ptr[i + 1] = out_ptr[i] + indptr[order[i] + 1] - indptr[order[i]]
    out = np.empty(out_ptr[-1], np.int32)
    for i in range(len(order)):
        lo = indptr[order[i]]
        out[out_ptr[i] : out_ptr[i + 1]] = indices[lo : indptr[order[i] + 1]]
    return out_ptr, out


def greedy_coverage(
    indptr: np.ndarray, indices: np.ndarray, budget: int, weights: np.ndarray | None = None
) -> Selection:
    n = len(indptr) - 1
    d = int(indices.max()) + 1 if indices.size else 1
    w = np.ones(d) if weights is None else np.asarray(weights, dtype=np.float64)[:d]
    units = np.round(w * UNIT)
    if np.any(units / UNIT != w) or np.any(units < 0):
        raise ValueError(f"coverage weights must be non-negative multiples of 1/{UNIT} (idf_weights gives such)")
    indptr, indices = np.asarray(indptr, np.int64), np.asarray(indices, np.int32)
    totals = _row_totals(indptr, indices, units)
    if n and totals.max() >= 2**31:
        raise ValueError("a sample's total feature weight overflows the greedy's 32-bit gains")
    post_ptr, post_rows = _postings(indptr, indices, d)
    split = _thread_splits(post_ptr, post_rows, n, numba.get_num_threads())
    order, gains, resets = _greedy(
        indptr, indices, units.astype(np.int32), totals.astype(np.int32), post_rows, split, min(budget, n)
    )
    return Selection(order, gains / UNIT, resets.tolist())


@numba.njit(cache=True)
def _row_totals(indptr, indices, units):
    # integers in float64: exact far past any real pool; no per-entry temporaries (a running sum over
    # the entries took 3 arrays of 8 B an entry, 3 GB for a 2M-row RandGreeDi partition)
    totals = np.zeros(indptr.size - 1)
    for r in range(indptr.size - 1):
        for p in range(indptr[r], indptr[r + 1]):
            totals[r] += units[indices[p]]
    return totals


@numba.njit(cache=True)
def _postings(indptr, indices, d):
    """The inverted index: for each feature, the rows holding it, ascending (a counting sort)."""
    ptr = np.zeros(d + 1, np.int64)
    for p in range(indices.size):
        ptr[indices[p] + 1] += 1
    for j in range(d):
        ptr[j + 1] += ptr[j]
    fill = ptr[:-1].copy()
    rows = np.empty(indices.size, np.int32)
    for r in range(indptr.size - 1):
        for p in range(indptr[r], indptr[r + 1]):
            rows[fill[indices[p]]] = r
            fill[indices[p]] += 1
    return ptr, rows


@numba.njit(cache=True)
def _thread_splits(post_ptr, post_rows, n, threads):
    """split[j, t]: where thread t's rows start in feature j's postings. Threads own whole blocks,
    so no two threads touch one block's counters."""
    nb = (n + (1 << SHIFT) - 1) >> SHIFT
    starts = np.empty(threads, np.int32)
    for t in range(threads):
        starts[t] = ((nb * t) // threads) << SHIFT
    split = np.empty((post_ptr.size - 1, threads + 1), np.int64)
    for j in range(post_ptr.size - 1):
        lo, hi = post_ptr[j], post_ptr[j + 1]
        split[j, :threads] = lo + np.searchsorted(post_rows[lo:hi], starts)
        split[j, threads] = hi
    return split


@numba.njit(cache=True, inline="always")
def _better(gain_a, size_a, gain_b, size_b) -> bool:
    return gain_a > gain_b or (gain_a == gain_b and size_a > size_b)


@numba.njit(cache=True)
def _rescan(gain, sizes, b, top_gain, top_size, top_count):
    g, s, c = -1, -1, 0
    for r in range(b << SHIFT, min(gain.size, (b + 1) << SHIFT)):
        if gain[r] == g and sizes[r] == s:
            c += 1
        elif _better(gain[r], sizes[r], g, s):
            g, s, c = gain[r], sizes[r], 1
    top_gain[b], top_size[b], top_count[b] = g, s, c


@numba.njit(cache=True)
def _greedy(indptr, indices, units, totals, post_rows, split, budget):
    n = indptr.size - 1
    sizes = indptr[1:] - indptr[:-1]
    nb = (n + (1 << SHIFT) - 1) >> SHIFT
    gain = totals.copy()  # exact gain of each remaining row against `covered`; negative once chosen
    top_gain, top_size, top_count = np.empty(nb, np.int64), np.empty(nb, np.int64), np.empty(nb, np.int64)
    stale = np.zeros(nb, np.bool_)  # every row at the block's max has dropped: the max is only a bound
    for b in range(nb):
        _rescan(gain, sizes, b, top_gain, top_size, top_count)
    covered = np.zeros(units.size, np.bool_)
    n_covered = 0
    fresh = np.empty(units.size, np.int64)
    order, gains = np.empty(budget, np.int64), np.empty(budget, np.int64)
    resets = []
    picks = 0
    while picks < budget:
        while True:  # the best block by bound (earlier block on ties), exact once rescanned
            best = 0
            for b in range(1, nb):
                if _better(top_gain[b], top_size[b], top_gain[best], top_size[best]):
                    best = b
            if not stale[best]:
                break
            _rescan(gain, sizes, best, top_gain, top_size, top_count)
            stale[best] = False
        if top_gain[best] == 0 and n_covered > 0:  # saturated: nothing adds anything, start over
            resets.append(picks)
            covered[:] = False
            n_covered = 0
            for r in range(n):
                if gain[r] >= 0:
                    gain[r] = totals[r]
            for b in range(nb):
                _rescan(gain, sizes, b, top_gain, top_size, top_count)
                stale[b] = False
            continue
        row = best << SHIFT
        while gain[row] != top_gain[best] or sizes[row] != top_size[best]:
            row += 1
        order[picks], gains[picks] = row, gain[row]
        picks += 1
        gain[row] = -1
        top_count[best] -= 1
        stale[best] = top_count[best] == 0
        m = 0
        for p in range(indptr[row], indptr[row + 1]):
            j = indices[p]
            if not covered[j]:
                covered[j] = True
                n_covered += 1
                if units[j] > 0:
                    fresh[m] = j
                    m += 1
        _cover(fresh[:m], units, post_rows, split, gain, sizes, top_gain, top_size, top_count, stale)
    return order, gains, np.array(resets, dtype=np.int64)


@numba.njit(cache=True, parallel=True)
def _cover(fresh, units, post_rows, split, gain, sizes, top_gain, top_size, top_count, stale):
    """Subtract each newly covered feature's weight from the remaining rows that hold it."""
    for t in numba.prange(split.shape[1] - 1):
        for j in fresh:
            for q in range(split[j, t], split[j, t + 1]):
                r = post_rows[q]
                g = gain[r]
                if g < 0:
                    continue
                gain[r] = g - units[j]
                b = r >> SHIFT
                if g == top_gain[b] and sizes[r] == top_size[b]:
                    top_count[b] -= 1
                    if top_count[b] == 0:
                        stale[b] = True
