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
with the longest posting lists. Each candidate y is first bounded by its signatures,
A(y) folded onto 1,024 bits and then onto 4,096 (the bits of A(x) it also has, plus
A(x)'s own bit collisions, is at least the overlap), and only then verified against a
mark array of A(x), stopping as soon as the answer is known. At low theta nearly
every candidate fails a bound, most in two cache lines instead of a walk over A(y).
The result is exact: no similar pair is missed. Samples with no activated feature
are never similar to anything.

A pass checks a batch of visited rows at a time on all threads against the rows kept
before the batch, then the batch's survivors one by one against the batch's own kept
rows: the same result as one row at a time. theta's search on a large pool starts from a
guess and gallops to a bracket, so it runs two to four passes near the answer instead of
eight from [0, 1]. The guess extrapolates: theta grows with the pool (more rows meet more
similar kept ones), by about as much from a random tenth of it to the whole as from a
hundredth to the tenth, each searched the same way.

With `rare` > 0 the search is approximate, and cheap at a million samples: a kept sample is indexed
by at most its `rare` rarest features (METHODS.md's inverted index over rare features), so a similar
pair is missed when none of those is in the visited sample's probe. At low theta the exact prefixes
cover nearly whole sets, and the popular features' postings make an exact pass quadratic.
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
# A signature: the set folded onto FOLD_WORDS * 64 bits, then onto SIG_WORDS * 64 bits (640 B in all). The
# folded bound is read first, from the signature's first two cache lines: at 1M rows it rejects most
# candidates (about 20 % off a pass, measured), and the full one rejects nearly all the rest.
FOLD_WORDS, SIG_WORDS = 16, 64
SEED_ROWS = 50_000  # larger pools start theta's search from a subsample's
# What simscale holds beside its CSR: the entries as rarity ranks and the kept rows' prefix postings
# and sets (int32), the visit order (8 B a row), and a signature and offsets a kept row
# (8 * (FOLD_WORDS + SIG_WORDS) + 24 B). Measured: 483 MB over the CSR for 1M rows of 64 entries,
# 100k kept, with the rare index; this charges 586 MB.
BYTES_PER_ENTRY = 8
BYTES_PER_ROW = 8
BYTES_PER_KEPT = 8 * (FOLD_WORDS + SIG_WORDS) + 24


def working_bytes(rows: int, entries: int, kept: int) -> int:
    return BYTES_PER_ENTRY * entries + BYTES_PER_ROW * rows + BYTES_PER_KEPT * kept


@dataclass
class Filtered:
    order: np.ndarray  # kept rows, in visit order
    theta: float
    passes: int  # filter passes the search ran
    rise: float = 0.0  # how far theta rose from the one a random tenth of the pool needed (0: not seeded)


def simscale(
    indptr: np.ndarray, indices: np.ndarray, budget: int, precision: float = 1 / 128, rare: int = 0
) -> Filtered:
    """The rows kept at the smallest theta (within `precision`) whose pass reaches the budget, cut at it."""
    indptr = np.asarray(indptr, np.int64)
    n = len(indptr) - 1
    budget = min(budget, n)
    ranked, visit = _rarest_first(indptr, np.asarray(indices))
    df = document_frequency(ranked)
    search = _Search(lambda theta: _timed_filter(indptr, ranked, visit, theta, budget, df, rare), budget)
    if not search.tries(1.0):  # even theta = 1 (drop only identical sets) keeps too few: keep all it keeps
        log.warning("simscale: only %d samples have distinct activated sets; budget was %d", len(search.best), budget)
        return Filtered(search.best, 1.0, search.passes)
    tenth = _tenth(indptr, indices, budget, precision, rare) if n > SEED_ROWS else None
    if tenth is not None:
        search.gallop(tenth.theta + tenth.rise, precision)
    while search.hi - search.lo > precision:
        search.tries((search.lo + search.hi) / 2)
    rise = search.hi - tenth.theta if tenth is not None else 0.0
    return Filtered(search.best[:budget], search.hi, search.passes, rise)


class _Search:
    """theta's bracket: passes at lo kept fewer than the budget, a pass at hi reached it (best)."""

    def __init__(self, run, budget: int):
        self.run, self.budget = run, budget
        self.lo, self.hi, self.best, self.passes = 0.0, 1.0, None, 0

    def tries(self, theta: float) -> bool:
        kept = self.run(theta)
        self.passes += 1
        if len(kept) >= self.budget:
            self.hi, self.best = theta, kept
            return True
        self.lo = theta
        if self.best is None:
            self.best = kept
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


def _tenth(indptr, indices, budget: int, precision: float, rare: int) -> Filtered:
    """SimScale on a random tenth of the pool, for a tenth of the budget (itself seeded from a hundredth
    when a tenth is large enough)."""
    n = len(indptr) - 1
    rows = np.sort(np.random.default_rng(0).choice(n, n // 10, replace=False))
    counts = indptr[rows + 1] - indptr[rows]
    take = np.repeat(indptr[rows] - np.r_[0, np.cumsum(counts)[:-1]], counts) + np.arange(counts.sum())
    sub = simscale(np.r_[0, np.cumsum(counts)], indices[take], max(1, budget // 10), precision, rare)
    log.info("simscale: a tenth of the pool needs theta %.4f (%.4f above a hundredth, if seeded)", sub.theta, sub.rise)
    return sub


def _timed_filter(indptr, ranked, visit, theta, budget, df, rare):
    start = time.perf_counter()
    kept = _filter(indptr, ranked, visit, theta, budget, df, rare, BATCH, numba.get_num_threads())
    log.info(
        "simscale: theta %.4f keeps %d of %d wanted (%.1f s)", theta, len(kept), budget, time.perf_counter() - start
    )
    return kept


def _rarest_first(indptr, indices):
    """Each row's features as global rarity ranks, ascending; and the visit order, largest set first."""
    df = document_frequency(indices)
    rank = np.empty(df.size, np.int32)
    rank[np.argsort(df, kind="stable")] = np.arange(df.size)  # ties to the smaller feature id
    ranked = rank[indices]
    _sort_rows(indptr, ranked)
    visit = np.argsort(-np.diff(indptr), kind="stable")  # ties to the earlier row
    return ranked, visit


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
def _filter(indptr, ranked, visit, theta, stop_at, df, rare, batch, threads):
    """One pass at a fixed theta; stops once `stop_at` rows are kept. rare > 0: index at most `rare` per row.

    Visited rows are checked a batch at a time, split between the threads, against the rows kept before
    the batch (the index is read-only meanwhile). The batch's survivors are then checked in visit order
    against the rows kept earlier in the same batch, through the same postings (the entries past `fill0`),
    and indexed: so the result is the one-at-a-time filter's, whatever the batch size or thread count."""
    n, d = indptr.size - 1, df.size
    start = np.zeros(d + 1, np.int64)  # feature f's postings (kept rows' prefixes) fill rows[start[f]:fill[f]]
    for f in range(d):
        start[f + 1] = start[f] + df[f]
    fill = start[:-1].copy()
    fill0 = fill.copy()  # fill as the batch began: the entries past it are the batch's own
    rows = np.empty(start[d], np.int32)  # positions in `kept`
    mark = np.full((threads, d), -1, np.int32)  # mark[t, f] == x: f is in A(x), to verify in |A(y)| lookups
    seen = np.full((threads, stop_at), -1, np.int32)  # seen[t, k] == x: kept[k] already checked
    similar = np.zeros(batch, np.bool_)
    kept = np.empty(stop_at, np.int64)
    # the kept rows' features again, in keeping order: verifying reads these, not the whole pool's
    kept_ptr = np.zeros(stop_at + 1, np.int64)
    kept_feats = np.empty(min(ranked.size, stop_at * _widest(indptr)), np.int32)
    kept_sig = np.zeros((stop_at, FOLD_WORDS + SIG_WORDS), np.uint64)
    x_sig = np.zeros((threads, FOLD_WORDS + SIG_WORDS), np.uint64)
    n_kept = 0
    for lo in range(0, n, batch):
        if n_kept == stop_at:
            break
        hi = min(n, lo + batch)
        per = (hi - lo + threads - 1) // threads
        for t in numba.prange(threads):
            for i in range(lo + t * per, min(hi, lo + (t + 1) * per)):
                x = visit[i]
                similar[i - lo] = _similar(ranked[indptr[x] : indptr[x + 1]], x, theta, start, fill, rows, kept_ptr,
                                           kept_feats, kept_sig, mark[t], seen[t], x_sig[t])  # fmt: skip
        first = n_kept
        for i in range(lo, hi):
            if n_kept == stop_at:
                break
            x = visit[i]
            fx = ranked[indptr[x] : indptr[x + 1]]
            if similar[i - lo] or _similar(
                fx, x, theta, fill0, fill, rows, kept_ptr, kept_feats, kept_sig, mark[0], seen[0], x_sig[0]
            ):
                continue
            kept[n_kept] = x
            kept_ptr[n_kept + 1] = kept_ptr[n_kept] + fx.size
            kept_feats[kept_ptr[n_kept] : kept_ptr[n_kept + 1]] = fx
            _signature(fx, kept_sig[n_kept])
            for f in fx[: _indexed(theta, fx.size, rare)]:
                rows[fill[f]] = n_kept
                fill[f] += 1
            n_kept += 1
        for k in range(first, n_kept):
            for f in kept_feats[kept_ptr[k] : kept_ptr[k] + _indexed(theta, kept_ptr[k + 1] - kept_ptr[k], rare)]:
                fill0[f] = fill[f]
    return kept[:n_kept]


@numba.njit(cache=True)
def _widest(indptr):
    return np.max(indptr[1:] - indptr[:-1]) if indptr.size > 1 else 0


@numba.njit(cache=True, inline="always")
def _indexed(theta, sy, rare):
    """How many of kept y's rarest features are indexed: a later x shares at least ceil(theta |A(y)|) of
    them, whatever its size, so all but that many minus one; at most `rare` in the rare index."""
    indexed = min(sy, sy - int(np.ceil(theta * sy - 1e-9)) + 1)
    return min(indexed, rare) if rare > 0 else indexed


@numba.njit(cache=True, inline="always")
def _signature(fx, sig):
    """A(x) as FOLD_WORDS * 64 bits, then SIG_WORDS * 64 bits, feature rank r at bit r % each (so the
    most popular features, the ones most pairs share, get a bit each); returns how many features landed
    on a bit already set, in each."""
    sig[:] = 0
    folded = collided = 0
    for f in fx:
        folded += _set_bit(sig, f % (FOLD_WORDS * 64))
        collided += _set_bit(sig, FOLD_WORDS * 64 + f % (SIG_WORDS * 64))
    return folded, collided


@numba.njit(cache=True, inline="always")
def _set_bit(sig, b) -> int:
    w, m = b >> 6, np.uint64(1) << np.uint64(b & 63)
    was = (sig[w] & m) != 0
    sig[w] |= m
    return was


@numba.njit(cache=True, inline="always")
def _bound(x_sig, y_sig, collided, lo, hi) -> int:
    """At least the features x and y share: x's bits in words lo:hi that y also has, plus x's own
    features that shared a bit there with another of x's."""
    bound = collided
    for w in range(lo, hi):
        bound += _popcount(x_sig[w] & y_sig[w])
    return bound


@numba.njit(cache=True, inline="always")
def _popcount(v):
    v = v - ((v >> np.uint64(1)) & np.uint64(0x5555555555555555))
    v = (v & np.uint64(0x3333333333333333)) + ((v >> np.uint64(2)) & np.uint64(0x3333333333333333))
    v = (v + (v >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (v * np.uint64(0x0101010101010101)) >> np.uint64(56)


@numba.njit(cache=True)
def _similar(fx, x, theta, lo, hi, rows, kept_ptr, kept_feats, kept_sig, mark, seen, x_sig) -> bool:
    """Whether a kept y in feature f's postings rows[lo[f]:hi[f]], for f in x's probe, has J >= theta.
    fx: A(x), rarest first."""
    sx = fx.size
    if sx == 0:
        return False
    for f in fx:
        mark[f] = x
    folded, collided = _signature(fx, x_sig)
    # y was visited first, so |A(y)| >= |A(x)| and they share at least _need(sx, sx) features
    for f in fx[: sx - _need(theta, sx, sx) + 1]:
        for q in range(lo[f], hi[f]):
            k = rows[q]
            if seen[k] == x:
                continue
            seen[k] = x
            c, e = kept_ptr[k], kept_ptr[k + 1]
            if sx < theta * (e - c):  # J <= |A(x)| / |A(y)|
                continue
            need = _need(theta, sx, e - c)
            if _bound(x_sig, kept_sig[k], folded, 0, FOLD_WORDS) < need:
                continue
            if _bound(x_sig, kept_sig[k], collided, FOLD_WORDS, FOLD_WORDS + SIG_WORDS) < need:
                continue
            shared = 0
            for r in range(c, e):  # stop as soon as the answer is known either way
                if mark[kept_feats[r]] == x:
                    shared += 1
                    if shared >= need:
                        return True
                elif shared + (e - r - 1) < need:
                    break
    return False
