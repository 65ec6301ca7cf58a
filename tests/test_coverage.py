"""Lazy greedy coverage picks exactly what the naive greedy loop picks."""

import numpy as np
import pytest

from raysel.coverage import idf_weights, lazy_greedy


def naive_greedy(indptr, indices, budget, weights=None):
    """The reference, on Python sets: every step scores every remaining sample."""
    rows = [set(indices[indptr[i]: indptr[i + 1]].tolist()) for i in range(len(indptr) - 1)]
    w = np.ones(int(indices.max()) + 1) if weights is None else weights

    def gain(i, covered):
        return float(np.sum(w[np.array(sorted(rows[i] - covered), dtype=np.int64)]))

    covered, remaining, order, gains, resets = set(), set(range(len(rows))), [], [], []
    while len(order) < min(budget, len(rows)):
        best = max(remaining, key=lambda i: (gain(i, covered), len(rows[i]), -i))
        if gain(best, covered) == 0 and covered:
            resets.append(len(order))
            covered = set()
            continue
        order.append(best)
        gains.append(gain(best, covered))
        covered |= rows[best]
        remaining.discard(best)
    return np.array(order), np.array(gains), resets


def random_sets(seed: int, n: int = 150, d: int = 60):
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, d + 1) ** 1.1  # Zipf-like: a few features everywhere, most rare
    rows = [np.unique(rng.choice(d, size=rng.integers(0, 12), p=popularity / popularity.sum())) for _ in range(n)]
    indptr = np.r_[0, np.cumsum([len(r) for r in rows])]
    return indptr, np.concatenate(rows).astype(np.int64), d


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("weighted", [False, True])
def test_lazy_greedy_equals_naive_greedy(seed, weighted):
    indptr, indices, d = random_sets(seed)
    weights = idf_weights(indices, len(indptr) - 1) if weighted else None
    budget = 120  # past saturation: coverage resets at least once
    lazy = lazy_greedy(indptr, indices, budget, weights)
    order, gains, resets = naive_greedy(indptr, indices, budget, weights)
    assert lazy.order.tolist() == order.tolist()
    np.testing.assert_array_equal(lazy.gains, gains)
    assert lazy.resets == resets and lazy.resets, "the budget should reach saturation"
    assert len(set(lazy.order.tolist())) == budget


def test_picks_cover_then_reset_exactly_when_no_gain_remains():
    # rows: {0,1,2}, {0,1}, {3}, {}, {2,3}
    indptr = np.array([0, 3, 5, 6, 6, 8])
    indices = np.array([0, 1, 2, 0, 1, 3, 2, 3])
    sel = lazy_greedy(indptr, indices, budget=5)
    # {0,1,2} first; then {2,3} and {3} both add 1 feature: the larger set wins; then nothing adds:
    # reset, and {0,1} (2 features) beats {3} (1); then only the empty row is left, adding
    # nothing: a second reset, after which it is picked with gain 0
    assert sel.order.tolist() == [0, 4, 1, 2, 3]
    assert sel.gains.tolist() == [3, 1, 2, 1, 0]
    assert sel.resets == [2, 4]
    assert sel.resets == naive_greedy(indptr, indices, budget=5)[2]
