"""The greedy coverage picks exactly what the naive greedy loop picks."""

import numpy as np
import pytest

from raysel.methods.coverage_kernel import greedy_coverage, idf_weights, seeded_coverage


def naive_greedy(indptr, indices, budget, weights=None):
    """The reference, on Python sets: every step scores every remaining sample."""
    rows = [set(indices[indptr[i] : indptr[i + 1]].tolist()) for i in range(len(indptr) - 1)]
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
def test_greedy_coverage_equals_naive_greedy(seed, weighted):
    indptr, indices, d = random_sets(seed)
    weights = idf_weights(indices, len(indptr) - 1) if weighted else None
    budget = 120  # past saturation: coverage resets at least once
    sel = greedy_coverage(indptr, indices, budget, weights)
    order, gains, resets = naive_greedy(indptr, indices, budget, weights)
    assert sel.order.tolist() == order.tolist()
    np.testing.assert_array_equal(sel.gains, gains)
    assert sel.resets == resets and sel.resets, "the budget should reach saturation"
    assert len(set(sel.order.tolist())) == budget


def dense_greedy(indptr, indices, budget, weights):
    """The same naive loop on a dense 0/1 matrix: every step scores every remaining row at once."""
    n, d = len(indptr) - 1, len(weights)
    x = np.zeros((n, d))
    x[np.repeat(np.arange(n), np.diff(indptr)), indices] = 1.0
    sizes, covered, left, order, resets = np.diff(indptr), np.zeros(d, bool), np.ones(n, bool), [], []
    while len(order) < budget:
        gain = x @ np.where(covered, 0.0, weights)
        gain = np.where(left, gain, -1.0)
        best = int(np.argmax(np.where(gain == gain.max(), sizes, -1)))  # then size, then the earliest row
        if gain[best] == 0 and covered.any():
            resets.append(len(order))
            covered[:] = False
            continue
        order.append(best)
        covered |= x[best] > 0
        left[best] = False
    return order, resets


@pytest.mark.parametrize("weighted", [False, True])
def test_equals_naive_greedy_across_blocks_and_threads(weighted):
    # 5000 rows span five 1024-row blocks, split between the update threads
    rng = np.random.default_rng(7)
    d = 300
    popularity = 1.0 / np.arange(1, d + 1)
    rows = [np.unique(rng.choice(d, size=rng.integers(1, 20), p=popularity / popularity.sum())) for _ in range(5000)]
    indptr = np.r_[0, np.cumsum([len(r) for r in rows])]
    indices = np.concatenate(rows)
    weights = idf_weights(indices, len(rows)) if weighted else np.ones(d)
    sel = greedy_coverage(indptr, indices, 600, weights if weighted else None)
    order, resets = dense_greedy(indptr, indices, 600, weights)
    assert sel.order.tolist() == order
    assert sel.resets == resets and len(resets) >= 2


def test_weights_off_the_1024_grid_are_refused():
    with pytest.raises(ValueError, match="multiples of 1/1024"):
        greedy_coverage(np.array([0, 2]), np.array([0, 1]), 1, np.array([0.3, 1.0]))


def test_picks_cover_then_reset_exactly_when_no_gain_remains():
    # rows: {0,1,2}, {0,1}, {3}, {}, {2,3}
    indptr = np.array([0, 3, 5, 6, 6, 8])
    indices = np.array([0, 1, 2, 0, 1, 3, 2, 3])
    sel = greedy_coverage(indptr, indices, budget=5)
    # {0,1,2} first; then {2,3} and {3} both add 1 feature: the larger set wins; then nothing adds:
    # reset, and {0,1} (2 features) beats {3} (1); then only the empty row is left, adding
    # nothing: a second reset, after which it is picked with gain 0
    assert sel.order.tolist() == [0, 4, 1, 2, 3]
    assert sel.gains.tolist() == [3, 1, 2, 1, 0]
    assert sel.resets == [2, 4]
    assert sel.resets == naive_greedy(indptr, indices, budget=5)[2]


def test_empty_rows_at_the_end_are_picked_last():
    # rows: {0, 1}, {}, {} -- a partition can end in samples with nothing above tau
    sel = greedy_coverage(np.array([0, 2, 2, 2]), np.array([0, 1]), budget=3)
    assert sel.order.tolist() == [0, 1, 2] and sel.gains.tolist() == [2, 0, 0]


def test_seeded_coverage_breaks_ties_by_the_ids_hash_and_picks_what_the_naive_greedy_picks_in_that_order():
    """Would catch the last tie going to where an id sorts (a bias toward sources spelt early in the
    alphabet: `alpaca_...` over `gsm8k_...`), a pick mapped back to the wrong row, or the seed unused."""
    from raysel.core.features import seeded_hash

    rng = np.random.default_rng(3)
    sets = [sorted(set(rng.integers(0, 12, size=rng.integers(1, 4)).tolist())) for _ in range(60)]
    indptr = np.r_[0, np.cumsum([len(s) for s in sets])].astype(np.int64)
    indices = np.array([j for s in sets for j in s], np.int32)
    ids = np.array([f"id{i:03d}" for i in range(60)], dtype=object)
    picks = {}
    for seed in (0, 1):
        chosen = seeded_coverage(ids, indptr, indices, 20, seed)
        order = np.argsort(seeded_hash(list(ids), seed), kind="stable")
        ref_ptr = np.r_[0, np.cumsum([len(sets[r]) for r in order])].astype(np.int64)
        ref, gains, _ = naive_greedy(ref_ptr, np.array([j for r in order for j in sets[r]], np.int32), 20)
        assert chosen.order.tolist() == order[ref].tolist() and chosen.gains.tolist() == gains.tolist()
        picks[seed] = chosen.order.tolist()
    assert picks[0] != picks[1] and picks[0] != greedy_coverage(indptr, indices, 20).order.tolist()
