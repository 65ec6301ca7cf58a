"""SimScale keeps no pair at or above theta, lands on the budget, and equals the all-pairs filter."""

import numpy as np
import pytest

from raysel.methods.simscale_kernel import simscale


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.union1d(a, b).size
    return np.intersect1d(a, b).size / union if union else 0.0


def zipf_sets(seed: int, n: int = 400, d: int = 120):
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, d + 1)
    rows = [np.unique(rng.choice(d, size=rng.integers(0, 25), p=popularity / popularity.sum())) for _ in range(n)]
    rows[7] = rows[3].copy()  # an exact duplicate: never both kept
    indptr = np.r_[0, np.cumsum([len(r) for r in rows])]
    return indptr, np.concatenate(rows).astype(np.int64), rows


def all_pairs_filter(rows, theta):
    """The reference: largest set first, each checked against every kept one."""
    kept = []
    for x in sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i)):
        if all(jaccard(rows[x], rows[y]) < theta for y in kept):
            kept.append(x)
    return kept


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [40, 150])
def test_simscale_is_exact_dissimilar_and_on_budget(seed, budget):
    indptr, indices, rows = zipf_sets(seed)
    result = simscale(indptr, indices, budget)
    kept = result.order.tolist()
    assert abs(len(kept) - budget) <= 0.01 * budget
    assert len(set(kept)) == len(kept)
    worst = max(jaccard(rows[a], rows[b]) for i, a in enumerate(kept) for b in kept[:i])
    assert worst < result.theta
    assert kept == all_pairs_filter(rows, result.theta)[:budget]
    # a theta just below the one found would not have reached the budget
    assert len(all_pairs_filter(rows, result.theta - 1 / 128)) < budget
    assert not (3 in kept and 7 in kept)


def test_budget_beyond_distinct_sets_keeps_every_distinct_set():
    indptr = np.array([0, 2, 4, 6, 7])
    indices = np.array([0, 1, 0, 1, 2, 3, 4])  # rows 0 and 1 are the same set
    result = simscale(indptr, indices, budget=4)
    assert sorted(result.order.tolist()) == [0, 2, 3] and result.theta == 1.0


def test_the_rare_index_misses_only_pairs_that_share_no_rare_feature():
    """Catches a rare mode that still indexes whole prefixes (exact, and as slow as exact), and one
    that loses pairs it should find. y comes first (ties to the earlier row); x shares only y's popular
    features, twin shares y's rarest ones too. Exact drops both; the rare index (y indexed by its 2
    rarest) still drops twin and keeps x."""
    from raysel.methods.simscale_kernel import _filter, _rarest_first

    popular = list(range(10, 20))
    fillers = [[10 + 2 * i, 11 + 2 * i, *range(100 + 10 * i, 108 + 10 * i)] for i in range(5)]  # popularity
    y, x, twin = [40, 41, *popular], [50, 51, *popular], [40, 41, 70, *popular[:-1]]
    rows = [y, x, twin, *fillers]
    indptr = np.r_[0, np.cumsum([len(r) for r in rows])]
    ranked, visit = _rarest_first(indptr, np.concatenate([np.sort(r) for r in rows]).astype(np.int64))
    df = np.bincount(ranked).astype(np.int64)

    def kept(rare: int) -> list[int]:
        return sorted(_filter(indptr, ranked, visit, 0.5, len(rows), df, rare).tolist())

    assert kept(0) == [0, *range(3, 8)] and kept(64) == kept(0)
    assert kept(2) == [0, 1, *range(3, 8)]
