"""SimScale keeps no pair at or above theta, lands on the budget, and equals the all-pairs filter."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raysel.methods.simscale_kernel import simscale


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.union1d(a, b).size
    return np.intersect1d(a, b).size / union if union else 1.0  # two empty sets are the same set


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


def test_samples_with_no_activated_feature_are_one_set_so_at_most_one_is_kept():
    """Would catch J(empty, empty) = 0: the 30 empty rows all kept as "diverse", at any theta, so a
    budget of 31 would be met at the lowest theta with one non-empty row."""
    rows = [np.array([i, 100 + i]) for i in range(20)] + [np.zeros(0, np.int64)] * 30
    indptr = np.r_[0, np.cumsum([len(r) for r in rows])]
    result = simscale(indptr, np.concatenate(rows), budget=31)
    kept = result.order.tolist()
    assert sorted(kept) == list(range(21)) and result.theta == 1.0  # the 20 sets and one empty row


def test_a_budget_only_theta_one_reaches_keeps_the_distinct_sets():
    """Catches a search that never runs the pass at theta = 1 once the distinct sets are counted: two
    sets with J = 256/257 are similar at every theta below 1 the bisection tries, so only theta = 1
    keeps all three."""
    rows = [np.arange(257), np.arange(256), np.array([1000])]
    indptr = np.r_[0, np.cumsum([len(r) for r in rows])]
    result = simscale(indptr, np.concatenate(rows), budget=3)
    assert result.theta == 1.0 and sorted(result.order.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("popular", [0, 60, 110, 120])
def test_batches_and_threads_keep_what_one_at_a_time_keeps(popular):
    """Catches a batch whose survivors are not checked against the rows kept earlier in the same batch
    (two similar rows of one batch both kept), a batch that indexes its rows twice or not at all,
    threads that share scratch arrays or bitmasks, and an overlap miscounted where the features split
    between the bitmasks and the postings (all in bitmasks, half, none): at every split the rows kept
    are the all-pairs filter's. batch = 1 is the one-at-a-time filter."""
    import numba

    from raysel.methods.simscale_kernel import _filter, _rarest_first

    indptr, indices, rows = zipf_sets(5, n=600)
    ranked, visit = _rarest_first(np.asarray(indptr, np.int64), indices)
    df = np.bincount(ranked).astype(np.int64)
    threads = numba.get_num_threads()
    for theta in (3 / 16, 5 / 16, 13 / 32):  # dyadic, as the search's are: J >= 0.2 would meet float rounding
        one = _filter(indptr, ranked, visit, theta, 600, df, 1, 1, popular).tolist()
        assert 50 < len(one) < 550  # some rows kept, some dropped as similar
        assert one == all_pairs_filter(rows, theta)
        for batch, n_threads in ((7, threads), (64, threads), (64, 1), (1000, threads), (64, 3)):
            assert _filter(indptr, ranked, visit, theta, 600, df, batch, n_threads, popular).tolist() == one


@pytest.mark.parametrize("seed_rows", [1000, 200])
def test_a_search_seeded_from_a_subsample_still_ends_next_to_the_smallest_theta(monkeypatch, seed_rows):
    """Catches a gallop that stops with the bracket still open (theta well above the smallest that
    reaches the budget), and one whose kept set is not the pass at the theta it reports. At 200 the
    300-row tenth is itself seeded from 30 rows, so the guess adds the rise between the two."""
    from raysel.methods import simscale_kernel
    from raysel.methods.simscale_kernel import BATCH, _filter, _rarest_first, popular_rank

    monkeypatch.setattr(simscale_kernel, "SEED_ROWS", seed_rows)
    indptr, indices, _ = zipf_sets(11, n=3000, d=300)
    budget = 300
    result = simscale(indptr, indices, budget)
    ranked, visit = _rarest_first(np.asarray(indptr, np.int64), indices)
    df = np.bincount(ranked).astype(np.int64)

    def at(theta: float) -> np.ndarray:
        return _filter(indptr, ranked, visit, theta, len(visit), df, BATCH, 2, popular_rank(df, len(visit)))

    assert at(result.theta)[:budget].tolist() == result.order.tolist()
    assert len(at(result.theta - 1 / 128)) < budget


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    rows=st.lists(st.lists(st.integers(0, 40), max_size=12).map(sorted).map(set), min_size=1, max_size=60),
    theta=st.integers(1, 64).map(lambda i: i / 64),
    split=st.floats(0, 1),
    batch=st.integers(1, 9),
)
def test_a_pass_is_the_all_pairs_filter_on_any_pool(rows, theta, split, batch):
    """Catches what the seeded pools above may not hold: empty sets (one set: at most one kept),
    duplicates, sets that differ by one feature at a theta just below their Jaccard, one-feature sets,
    and any split of the features between the bitmasks and the postings, at any batch size."""
    from raysel.methods.simscale_kernel import _filter, _rarest_first

    rows = [np.array(sorted(r), np.int64) for r in rows]
    indptr = np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int64)
    indices = np.concatenate([*rows, np.zeros(0, np.int64)])
    ranked, visit = _rarest_first(indptr, indices)
    df = np.bincount(ranked, minlength=1).astype(np.int64)
    popular = round(split * df.size)
    kept = _filter(indptr, ranked, visit, theta, len(rows), df, batch, 2, popular).tolist()
    assert kept == all_pairs_filter(rows, theta)
