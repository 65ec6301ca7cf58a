"""SAE-SimScale: keep a sample unless it is Jaccard-similar to one already kept.

Samples are visited largest activated set first (then by row). x is kept when
J(A(x), A(y)) < theta for every kept y. theta is binary-searched so that the
kept count reaches the budget; the kept list is then cut at the budget, which
keeps the property, since any subset of a dissimilar set is dissimilar.

Candidates never come from all pairs. They come from prefix filtering (the
AllPairs join): order features rarest first; J(x, y) >= theta means the two
share o >= theta (|x| + |y|) / (1 + theta) features, so a prefix of x and a
prefix of y (all but o - 1 features of each) must meet. A kept y is indexed by
its first |y| - ceil(theta |y|) + 1 features (o >= theta |y| whatever x is);
x, visited later and so no larger than y, probes with its first
|x| - o(|x|, |x|) + 1, which leaves out its most popular features, the ones
with the longest posting lists. Each candidate is verified against a mark
array of A(x), stopping as soon as the answer is known. The result is exact: no
similar pair is missed. Samples with no activated feature are never similar
to anything.

With `rare` > 0 the search is approximate, and cheap at a million samples: a kept sample is indexed
by at most its `rare` rarest features (METHODS.md's inverted index over rare features), so a similar
pair is missed when none of those is in the visited sample's probe. At low theta the exact prefixes
cover nearly whole sets, and the popular features' postings make an exact pass quadratic.
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


def simscale(
    indptr: np.ndarray, indices: np.ndarray, budget: int, precision: float = 1 / 128, rare: int = 0
) -> Filtered:
    indptr = np.asarray(indptr, np.int64)
    n = len(indptr) - 1
    budget = min(budget, n)
    ranked, visit = _rarest_first(indptr, np.asarray(indices, np.int64))
    df = np.bincount(ranked, minlength=int(ranked.max()) + 1 if ranked.size else 1).astype(np.int64)
    lo, hi, passes = 0.0, 1.0, 1
    kept = _filter(indptr, ranked, visit, 1.0, budget, df, rare)
    if len(kept) < budget:  # even theta = 1 (drop only identical sets) keeps too few: keep all it keeps
        log.warning("simscale: only %d samples have distinct activated sets; budget was %d", len(kept), budget)
        return Filtered(kept, 1.0, passes)
    best = kept
    while hi - lo > precision:  # the smallest theta whose pass still reaches the budget
        mid = (lo + hi) / 2
        kept = _filter(indptr, ranked, visit, mid, budget, df, rare)
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


@numba.njit(cache=True, inline="always")
def _need(theta, sx, sy):
    """The least overlap o at which J >= theta for sets of sizes sx and sy: o (1 + theta) >= theta (sx + sy)."""
    target = theta * (sx + sy)
    o = max(0, int(np.ceil(target / (1.0 + theta))) - 1)
    while o * (1.0 + theta) < target:  # settle float rounding on the exact inequality
        o += 1
    return o


@numba.njit(cache=True)
def _filter(indptr, ranked, visit, theta, stop_at, df, rare):
    """One pass at a fixed theta; stops once `stop_at` rows are kept. rare > 0: index at most `rare` per row."""
    n, d = indptr.size - 1, df.size
    start = np.zeros(d + 1, np.int64)  # feature f's postings (kept rows' prefixes) fill rows[start[f]:fill[f]]
    for f in range(d):
        start[f + 1] = start[f] + df[f]
    fill = start[:-1].copy()
    rows = np.empty(start[d], np.int32)
    mark = np.full(d, -1, np.int64)  # mark[f] == x: f is in A(x), for verifying a candidate in |A(y)| lookups
    seen = np.full(n, -1, np.int64)
    kept = np.empty(stop_at, np.int64)
    n_kept = 0
    for x in visit:
        if n_kept == stop_at:
            break
        a, b = indptr[x], indptr[x + 1]
        sx = b - a
        for p in range(a, b):
            mark[ranked[p]] = x
        # y was visited first, so |A(y)| >= |A(x)| and they share at least _need(sx, sx) features
        probe = sx - _need(theta, sx, sx) + 1 if sx else 0
        if _similar_to_kept(x, a, a + probe, indptr, ranked, theta, start, fill, rows, mark, seen):
            continue
        kept[n_kept] = x
        n_kept += 1
        # a later x shares at least ceil(theta |A(y)|) features with this y, whatever its size
        indexed = sx - int(np.ceil(theta * sx - 1e-9)) + 1
        indexed = min(indexed, rare) if rare > 0 else indexed
        for p in range(a, min(b, a + indexed)):
            rows[fill[ranked[p]]] = x
            fill[ranked[p]] += 1
    return kept[:n_kept]


@numba.njit(cache=True)
def _similar_to_kept(x, a, probe_end, indptr, ranked, theta, start, fill, rows, mark, seen) -> bool:
    sx = indptr[x + 1] - indptr[x]
    for p in range(a, probe_end):
        f = ranked[p]
        for q in range(start[f], fill[f]):
            y = rows[q]
            if seen[y] == x:
                continue
            seen[y] = x
            c, e = indptr[y], indptr[y + 1]
            if sx < theta * (e - c):  # J <= |A(x)| / |A(y)|
                continue
            need, shared = _need(theta, sx, e - c), 0
            for r in range(c, e):  # stop as soon as the answer is known either way
                if mark[ranked[r]] == x:
                    shared += 1
                    if shared >= need:
                        return True
                elif shared + (e - r - 1) < need:
                    break
    return False
