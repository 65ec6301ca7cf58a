"""SAE-SimScale: keep a sample unless it is Jaccard-similar to one already kept.

Samples are visited largest activated set first (ties in the order the
caller gives: the select stage passes the ids' seeded hash, never their id order). x is kept when
J(A(x), A(y)) < theta for every kept y. theta is binary-searched so that the
kept count reaches the budget; the kept list is then cut at the budget, which
keeps the property, since any subset of a dissimilar set is dissimilar.

The exact filter counts x's overlap with every kept y, and stops at the first y with
J >= theta. Features are ranked rarest first. The most popular ones are where an inverted
index degenerates: at the low theta a budget of 10 % needs, two sets are similar with 10
features in common out of 64, so every kept y that shares any feature with x is a
candidate, and the popular features' postings hold most kept rows. So each kept row
holds its popular features as a bitmask as well, and x's overlap on them with every kept y
is a popcount over a few contiguous words. Only the rest go through postings, counted
onto the same counters. At a high theta, where a similar y needs more features in common
than x has popular ones, it must share one of x's others: then only the kept rows their
postings reach are counted, and only their bitmasks read. How many features are popular
is chosen from the pool's frequencies (`popular_rank`). At a million samples of the
select-stage benchmark's store (64 activated features of 16k a sample), the pass that
reached the budget of 100k took 36 s this way, against 165 s for the prefix-filtered index
with bit-signature bounds it replaced, which kept the same rows. Samples with no activated
feature all have the same set, the empty one, so at most one of them is kept: J(∅, ∅) = 1.
(Taken as 0, every short sample with no feature above a calibrated tau was "diverse", and
their count pulled theta down.)

A pass checks a batch of visited rows at a time on all threads against the rows kept
before the batch, then the batch's survivors one by one against the batch's own kept
rows: the same result as one row at a time. theta's search on a large pool starts from a
guess and gallops to a bracket, so it runs two to four passes near the answer instead of
eight from [0, 1] (theta = 1, the bracket's top, is settled by counting distinct sets). The
guess extrapolates: theta grows with the pool (more rows meet more similar kept ones), by
about as much from a random tenth of it to the whole as from a hundredth to the tenth, each
searched the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numba
import numpy as np

from raysel.core.features import document_frequency

log = logging.getLogger(__name__)
BATCH = 256  # rows checked in parallel against the index as it stood before them
SEED_ROWS = 50_000  # larger pools start theta's search from a subsample's
# The popular features' bitmask: at most this many words a kept row. One word costs a popcount
# over contiguous memory, an entry of the rest's postings a counter update at a random place;
# measured on the select-stage store, a word costs about 1/32 of an entry (512 popular features,
# 8 words, was the fastest there: 2.1 s a pass of 300k rows, against 2.8 s for 256 or 1,024).
MAX_WORDS, WORD_COST = 64, 1 / 32
# What simscale holds beside its CSR: the entries as rarity ranks and the kept rows' postings
# (int32), the visit order and the sets' hashes (8 B a row each), and per kept row its bitmask,
# size and row (12 B), and per thread its counter, seen mark and touched list (int32 each).
BYTES_PER_ENTRY = 8
BYTES_PER_ROW = 16
BYTES_PER_KEPT = 8 * MAX_WORDS + 12
BYTES_PER_KEPT_THREAD = 12


def working_bytes(rows: int, entries: int, kept: int) -> int:
    per_kept = BYTES_PER_KEPT + BYTES_PER_KEPT_THREAD * numba.get_num_threads()
    return BYTES_PER_ENTRY * entries + BYTES_PER_ROW * rows + per_kept * kept


@dataclass
class Filtered:
    order: np.ndarray  # kept rows, in visit order
    theta: float
    passes: int  # filter passes the search ran
    rise: float = 0.0  # how far theta rose from the one a random tenth of the pool needed (0: not seeded)
    slowest: float = 0.0  # seconds, the slowest pass


def simscale(
    indptr: np.ndarray, indices: np.ndarray, budget: int, precision: float = 1 / 128, tie: np.ndarray | None = None
) -> Filtered:
    """The rows kept at the smallest theta (within `precision`) whose pass reaches the budget, cut at it.
    Rows of equal set size are visited in `tie` order (the select stage: the ids' seeded hash), else by row."""
    indptr = np.asarray(indptr, np.int64)
    n = len(indptr) - 1
    budget = min(budget, n)
    ranked, visit = _rarest_first(indptr, np.asarray(indices), tie)
    df = document_frequency(ranked)
    popular = popular_rank(df, n)
    threads = numba.get_num_threads()
    search = _Search(lambda theta: _filter(indptr, ranked, visit, theta, budget, df, BATCH, threads, popular), budget)
    # theta = 1 drops only identical sets, so it reaches the budget when there are that many distinct
    # ones; a pass there costs as much as one at the answer, so count them instead, and pass only if
    # too few (a hash collision can only undercount)
    if _distinct_at_least(indptr, ranked) < budget and not search.tries(1.0):
        log.warning("simscale: only %d samples have distinct activated sets; budget was %d", len(search.best), budget)
        return Filtered(search.best, 1.0, search.passes, slowest=search.slowest)
    tenth = _tenth(indptr, indices, budget, precision) if n > SEED_ROWS else None
    if tenth is not None:
        # ten times the rows, each checked against ten times the kept ones: a long search says so first
        log.info("simscale: a pass over all %d samples should take about %.0f s (the tenth's slowest took %.1f s)",
                 n, 100 * tenth.slowest, tenth.slowest)  # fmt: skip
        search.gallop(tenth.theta + tenth.rise, precision)
    while search.hi - search.lo > precision:
        search.tries((search.lo + search.hi) / 2)
    if search.best is None:  # every pass below 1 kept too few
        search.tries(1.0)
    rise = search.hi - tenth.theta if tenth is not None else 0.0
    return Filtered(search.best[:budget], search.hi, search.passes, rise, search.slowest)


class _Search:
    """theta's bracket: passes at lo kept fewer than the budget, a pass at hi reached it (best)."""

    def __init__(self, run, budget: int):
        self.run, self.budget = run, budget
        self.lo, self.hi, self.best, self.passes, self.slowest = 0.0, 1.0, None, 0, 0.0

    def tries(self, theta: float) -> bool:
        start = time.perf_counter()
        kept = self.run(theta)
        seconds = time.perf_counter() - start
        log.info("simscale: theta %.4f keeps %d of %d wanted (%.1f s)", theta, len(kept), self.budget, seconds)
        self.passes, self.slowest = self.passes + 1, max(self.slowest, seconds)
        if len(kept) >= self.budget:
            self.hi, self.best = theta, kept
            return True
        self.lo, self.best = theta, kept if theta == 1.0 else self.best
        return False

    def gallop(self, guess: float, precision: float) -> None:
        """From the guess, steps that double until the bracket closes around it: a pass far above the
        answer keeps rows until the budget, and costs as much as one next to it."""
        if not self.lo < guess < self.hi:
            return
        step, theta = precision, guess
        reached = self.tries(theta)
        while True:
            theta = theta - step if reached else theta + step
            if not self.lo < theta < self.hi or self.tries(theta) != reached:
                return
            step *= 2


def _tenth(indptr, indices, budget: int, precision: float) -> Filtered:
    """SimScale on a random tenth of the pool, for a tenth of the budget (itself seeded from a hundredth
    when a tenth is large enough)."""
    n = len(indptr) - 1
    rows = np.sort(np.random.default_rng(0).choice(n, n // 10, replace=False))
    counts = indptr[rows + 1] - indptr[rows]
    take = np.repeat(indptr[rows] - np.r_[0, np.cumsum(counts)[:-1]], counts) + np.arange(counts.sum())
    sub = simscale(np.r_[0, np.cumsum(counts)], indices[take], max(1, budget // 10), precision)
    log.info("simscale: a tenth of the pool needs theta %.4f (%.4f above a hundredth, if seeded)", sub.theta, sub.rise)
    return sub


def popular_rank(df: np.ndarray, rows: int) -> int:
    """The rank from which features go into the bitmask: the most popular 64 w, for the w that costs
    least. A counted overlap costs about what two random rows share on the features left to postings,
    the sum of their squared frequencies (a kept row meets x on each through one posting)."""
    share = np.sort(df)[::-1] / max(rows, 1)
    tail = np.r_[np.cumsum((share**2)[::-1])[::-1], 0.0]  # tail[i]: the expected overlap past the i most popular
    words = np.arange(MAX_WORDS + 1)
    best = int(np.argmin(WORD_COST * words + tail[np.minimum(64 * words, df.size)]))
    return max(0, df.size - 64 * best)


def _rarest_first(indptr, indices, tie=None):
    """Each row's features as global rarity ranks, ascending; and the visit order, largest set first
    (ties in `tie` order, else by row)."""
    df = document_frequency(indices)
    rank = np.empty(df.size, np.int32)
    rank[np.argsort(df, kind="stable")] = np.arange(df.size)  # ties to the smaller feature id
    ranked = rank[indices]
    _sort_rows(indptr, ranked)
    sizes = np.diff(indptr)
    visit = np.argsort(-sizes, kind="stable") if tie is None else np.lexsort((tie, -sizes))
    return ranked, visit


@numba.njit(cache=True)
def _distinct_at_least(indptr, ranked) -> int:
    """At most the number of distinct activated sets (the empty set among them)."""
    hashes = np.empty(indptr.size - 1, np.uint64)
    for i in range(indptr.size - 1):
        h = np.uint64(14695981039346656037)  # FNV-1a over the set's ranks, which are sorted
        for f in ranked[indptr[i] : indptr[i + 1]]:
            h = (h ^ np.uint64(f)) * np.uint64(1099511628211)
        hashes[i] = h
    return np.unique(hashes).size


@numba.njit(cache=True, parallel=True)
def _sort_rows(indptr, values):
    for i in numba.prange(indptr.size - 1):
        values[indptr[i] : indptr[i + 1]].sort()


@numba.njit(cache=True, inline="always")
def _need(theta, sx, sy):
    """The least overlap o at which J >= theta for sets of sizes sx and sy: o (1 + theta) >= theta (sx + sy)."""
    target = theta * (sx + sy)
    o = max(0, int(np.ceil(target / (1.0 + theta))) - 1)
    while o * (1.0 + theta) < target:  # settle float rounding on the exact inequality
        o += 1
    return o


@numba.njit(cache=True, parallel=True)
def _filter(indptr, ranked, visit, theta, stop_at, df, batch, threads, popular):
    """One pass at a fixed theta; stops once `stop_at` rows are kept. A kept row's features ranked
    from `popular` on go into its bitmask, the others into the postings.

    Visited rows are checked a batch at a time, split between the threads, against the rows kept
    before the batch (the index is read-only meanwhile). The batch's survivors are then checked in
    visit order against the rows kept earlier in the same batch (kept[first:], the postings past
    `fill0`), and indexed: so the result is the one-at-a-time filter's, whatever the batch size or
    thread count."""
    n, d = indptr.size - 1, df.size
    start = np.zeros(d + 1, np.int64)  # feature f's postings (positions in `kept`) fill rows[start[f]:fill[f]]
    for f in range(popular):
        start[f + 1] = start[f] + df[f]
    start[popular + 1 :] = start[popular]
    fill = start[:-1].copy()
    fill0 = fill.copy()  # fill as the batch began: the entries past it are the batch's own
    rows = np.empty(start[d], np.int32)
    masks = np.zeros((stop_at + threads, (d - popular + 63) // 64), np.uint64)  # kept rows', then x's a thread
    sizes = np.empty(stop_at, np.int32)
    count = np.empty((threads, stop_at), np.int32)  # a kept row's overlap with x
    seen = np.full((threads, stop_at), -1, np.int32)  # seen[t, k] == x: count[t, k] counts x's overlap
    touched = np.empty((threads, stop_at), np.int32)
    similar = np.zeros(batch, np.bool_)
    kept = np.empty(stop_at, np.int64)
    n_kept = 0
    for lo in range(0, n, batch):
        if n_kept == stop_at:
            break
        hi = min(n, lo + batch)
        per = (hi - lo + threads - 1) // threads
        for t in numba.prange(threads):
            for i in range(lo + t * per, min(hi, lo + (t + 1) * per)):
                x = visit[i]
                similar[i - lo] = _similar(ranked[indptr[x] : indptr[x + 1]], x, theta, popular, start, fill, rows,
                                           0, n_kept, sizes, masks, stop_at + t, count[t], seen[t], touched[t])  # fmt: skip
        first = n_kept
        for i in range(lo, hi):
            if n_kept == stop_at:
                break
            x = visit[i]
            fx = ranked[indptr[x] : indptr[x + 1]]
            if similar[i - lo] or _similar(fx, x, theta, popular, fill0, fill, rows, first, n_kept, sizes, masks,
                                           stop_at, count[0], seen[0], touched[0]):  # fmt: skip
                continue
            kept[n_kept], sizes[n_kept] = x, fx.size
            _mask(fx, popular, masks[n_kept])
            for f in fx[: np.searchsorted(fx, popular)]:
                rows[fill[f]] = n_kept
                fill[f] += 1
            n_kept += 1
        fill0[:] = fill
    return kept[:n_kept]


@numba.njit(cache=True, inline="always")
def _mask(fx, popular, out):
    """x's features ranked from `popular` on, as bits of `out`."""
    out[:] = 0
    for f in fx[np.searchsorted(fx, popular) :]:
        b = f - popular
        out[b >> 6] |= np.uint64(1) << np.uint64(b & 63)


@numba.njit(cache=True, inline="always")
def _popcount(v):
    v = v - ((v >> np.uint64(1)) & np.uint64(0x5555555555555555))
    v = (v & np.uint64(0x3333333333333333)) + ((v >> np.uint64(2)) & np.uint64(0x3333333333333333))
    v = (v + (v >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((v * np.uint64(0x0101010101010101)) >> np.uint64(56))  # int64: int + uint64 is a float


@numba.njit(cache=True)
def _similar(fx, x, theta, popular, lo, hi, rows, k_lo, k_hi, sizes, masks, x_mask, count, seen, touched) -> bool:
    """Whether a kept y among kept[k_lo:k_hi], whose postings are rows[lo[f]:hi[f]], has J >= theta.
    fx: A(x), rarest first. Every kept y was visited first, so |A(y)| >= |A(x)|."""
    sx = fx.size
    if sx == 0:  # empty sets come last in the visit order: one kept already is the last kept
        return k_hi > k_lo and sizes[k_hi - 1] == 0
    _mask(fx, popular, masks[x_mask])
    rest = np.searchsorted(fx, popular)
    least = _need(theta, sx, sx)  # the need of the smallest y; larger ones need more
    if least > sx - rest:  # more than x's popular features: a similar y shares one of the rest, so was touched
        return _touched_similar(
            fx[:rest], x, theta, sx, least, lo, hi, rows, sizes, masks, x_mask, count, seen, touched
        )
    for k in range(k_lo, k_hi):
        c = _overlap(masks, x_mask, k)
        count[k] = c
        if _reaches(c, least, theta, sx, sizes[k]):
            return True
    for f in fx[:rest]:
        for q in range(lo[f], hi[f]):
            k = rows[q]
            c = count[k] + 1
            count[k] = c
            if _reaches(c, least, theta, sx, sizes[k]):
                return True
    return False


@numba.njit(cache=True)
def _touched_similar(fr, x, theta, sx, least, lo, hi, rows, sizes, masks, x_mask, count, seen, touched) -> bool:
    """At a high theta: x's overlap on its rest features `fr` counted for the kept rows their postings
    reach, then their popular overlap added, and no other kept row looked at."""
    n_touched = 0
    for f in fr:
        for q in range(lo[f], hi[f]):
            k = rows[q]
            if seen[k] != x:
                seen[k], count[k] = x, 0
                touched[n_touched] = k
                n_touched += 1
            count[k] += 1
    for k in touched[:n_touched]:
        c = count[k] + _overlap(masks, x_mask, k)
        if _reaches(c, least, theta, sx, sizes[k]):
            return True
    return False


@numba.njit(cache=True, inline="always")
def _reaches(c, least, theta, sx, sy) -> bool:
    """Whether an overlap of c makes J >= theta for sizes sx and sy; `least`, the need of sy = sx,
    settles most without _need."""
    return c >= least and c >= _need(theta, sx, sy)


@numba.njit(cache=True, inline="always")
def _overlap(masks, x_mask, k):
    c = 0
    for w in range(masks.shape[1]):
        c += _popcount(masks[x_mask, w] & masks[k, w])
    return c
