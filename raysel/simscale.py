"""SAE-SimScale: keep a sample unless it is Jaccard-similar to one already kept.

Samples are visited largest activated set first (then by row). x is kept when
J(A(x), A(y)) < theta for every kept y. theta is binary-searched so that the
kept count reaches the budget; the kept list is then cut at the budget, which
keeps the property, since any subset of a dissimilar set is dissimilar.

Candidates never come from all pairs. They come from prefix filtering (the
AllPairs join): order features rarest first; if J(x, y) >= theta then the two
share at least ceil(theta * |x|) features, so the first |x| - ceil(theta * |x|) + 1
features of x meet those of y. Only those prefixes go into the inverted index,
so most lookups land on rare features with short posting lists, and the
result is exact: no similar pair is missed. Samples with no activated feature
are never similar to anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numba
import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Filtered:
    order: np.ndarray  # kept rows, in visit order
    theta: float
    passes: int  # filter passes the search ran


def simscale(indptr: np.ndarray, indices: np.ndarray, budget: int, precision: float = 1 / 128) -> Filtered:
    indptr = np.asarray(indptr, np.int64)
    n = len(indptr) - 1
    budget = min(budget, n)
    ranked, visit = _rarest_first(indptr, np.asarray(indices, np.int64))
    lo, hi, passes = 0.0, 1.0, 1
    kept = _filter(indptr, ranked, visit, 1.0, budget)
    if len(kept) < budget:  # even theta = 1 (drop only identical sets) keeps too few: keep all it keeps
        log.warning("simscale: only %d samples have distinct activated sets; budget was %d", len(kept), budget)
        return Filtered(kept, 1.0, passes)
    best = kept
    while hi - lo > precision:  # the smallest theta whose pass still reaches the budget
        mid = (lo + hi) / 2
        kept = _filter(indptr, ranked, visit, mid, budget)
        passes += 1
        if len(kept) >= budget:
            hi, best = mid, kept
        else:
            lo = mid
    return Filtered(best[:budget], hi, passes)


def _rarest_first(indptr, indices):
    """Each row's features as global rarity ranks, ascending; and the visit order, largest set first."""
    n = len(indptr) - 1
    df = np.bincount(indices, minlength=int(indices.max()) + 1 if indices.size else 1)
    rank = np.empty(df.size, np.int64)
    rank[np.lexsort((np.arange(df.size), df))] = np.arange(df.size)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    ranked = rank[indices]
    ranked = ranked[np.lexsort((ranked, rows))].astype(np.int32)  # rows stay in place; within a row, rarest first
    visit = np.lexsort((np.arange(n), -np.diff(indptr)))
    return ranked, visit


@numba.njit(cache=True)
def _filter(indptr, ranked, visit, theta, stop_at):
    """One pass at a fixed theta; stops once `stop_at` rows are kept."""
    n = indptr.size - 1
    d = int(ranked.max()) + 1 if ranked.size else 1
    head = np.full(d, -1, np.int64)  # posting lists of kept prefixes, linked through `nxt`
    capacity = min(ranked.size, stop_at * int(np.max(indptr[1:] - indptr[:-1])) if n else 0)
    nxt = np.empty(capacity, np.int64)
    who = np.empty(capacity, np.int64)
    seen = np.full(n, -1, np.int64)
    kept = np.empty(stop_at, np.int64)
    n_kept, n_entries = 0, 0
    for x in visit:
        if n_kept == stop_at:
            break
        a, b = indptr[x], indptr[x + 1]
        size = b - a
        prefix = size - int(np.ceil(theta * size - 1e-9)) + 1 if size else 0
        similar = False
        for p in range(a, a + min(prefix, size)):
            e = head[ranked[p]]
            while e >= 0 and not similar:
                y = who[e]
                e = nxt[e]
                if seen[y] == x:
                    continue
                seen[y] = x
                # visited earlier, so |A(y)| >= |A(x)|; J <= |A(x)| / |A(y)| rules out the much larger
                if size < theta * (indptr[y + 1] - indptr[y]):
                    continue
                shared = _overlap(ranked, a, b, indptr[y], indptr[y + 1])
                similar = shared >= theta * (size + indptr[y + 1] - indptr[y] - shared)
            if similar:
                break
        if similar:
            continue
        kept[n_kept] = x
        n_kept += 1
        for p in range(a, a + min(prefix, size)):
            who[n_entries], nxt[n_entries] = x, head[ranked[p]]
            head[ranked[p]] = n_entries
            n_entries += 1
    return kept[:n_kept]


@numba.njit(cache=True, inline="always")
def _overlap(ranked, a, b, c, d):
    """|A(x) & A(y)| of two rank-sorted rows."""
    count = 0
    while a < b and c < d:
        if ranked[a] == ranked[c]:
            count += 1
            a += 1
            c += 1
        elif ranked[a] < ranked[c]:
            a += 1
        else:
            c += 1
    return count
