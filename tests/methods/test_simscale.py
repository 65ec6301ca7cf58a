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
        return sorted(_filter(indptr, ranked, visit, 0.5, len(rows), df, rare, 1, 1).tolist())

    assert kept(0) == [0, *range(3, 8)] and kept(64) == kept(0)
    assert kept(2) == [0, 1, *range(3, 8)]


@pytest.mark.parametrize("rare", [0, 3])
def test_batches_and_threads_keep_what_one_at_a_time_keeps(rare):
    """Catches a batch whose survivors are not checked against the rows kept earlier in the same batch
    (two similar rows of one batch both kept), a batch that indexes its rows twice or not at all, and
    threads that share scratch arrays. batch = 1 is the one-at-a-time filter."""
    import numba

    from raysel.methods.simscale_kernel import _filter, _rarest_first

    indptr, indices, _ = zipf_sets(5, n=600)
    ranked, visit = _rarest_first(np.asarray(indptr, np.int64), indices)
    df = np.bincount(ranked).astype(np.int64)
    threads = numba.get_num_threads()
    for theta in (0.2, 0.3, 0.4):
        one = _filter(indptr, ranked, visit, theta, 600, df, rare, 1, 1).tolist()
        assert 50 < len(one) < 550  # some rows kept, some dropped as similar
        for batch, n_threads in ((7, threads), (64, threads), (64, 1), (1000, threads), (64, 3)):
            assert _filter(indptr, ranked, visit, theta, 600, df, rare, batch, n_threads).tolist() == one


@pytest.mark.parametrize("seed_rows", [1000, 200])
def test_a_search_seeded_from_a_subsample_still_ends_next_to_the_smallest_theta(monkeypatch, seed_rows):
    """Catches a gallop that stops with the bracket still open (theta well above the smallest that
    reaches the budget), and one whose kept set is not the pass at the theta it reports. At 200 the
    300-row tenth is itself seeded from 30 rows, so the guess adds the rise between the two."""
    from raysel.methods import simscale_kernel
    from raysel.methods.simscale_kernel import BATCH, _filter, _rarest_first

    monkeypatch.setattr(simscale_kernel, "SEED_ROWS", seed_rows)
    indptr, indices, _ = zipf_sets(11, n=3000, d=300)
    budget = 300
    result = simscale(indptr, indices, budget)
    ranked, visit = _rarest_first(np.asarray(indptr, np.int64), indices)
    df = np.bincount(ranked).astype(np.int64)

    def at(theta: float) -> np.ndarray:
        return _filter(indptr, ranked, visit, theta, len(visit), df, 0, BATCH, 2)

    assert at(result.theta)[:budget].tolist() == result.order.tolist()
    assert len(at(result.theta - 1 / 128)) < budget


def test_the_signature_bounds_hold_when_features_share_bits():
    """Catches a signature bound that forgets a set's own bit collisions (two of its features on one bit),
    which undercounts the overlap and so skips similar pairs unverified; and a folded bound read from the
    wrong words or with the full signature's collisions. Both must be at least the overlap."""
    from raysel.methods.simscale_kernel import FOLD_WORDS, SIG_WORDS, _bound, _signature

    rng = np.random.default_rng(3)
    base = rng.choice(3 * SIG_WORDS * 64, 300, replace=False)  # near-copies: overlaps of ~250
    sets = [np.unique(np.r_[base[rng.random(300) < 0.9], rng.choice(3 * SIG_WORDS * 64, 20)]) for _ in range(40)]
    sets = [s.astype(np.int32) for s in sets]
    sigs = np.zeros((len(sets), FOLD_WORDS + SIG_WORDS), np.uint64)
    collided = [_signature(s, sig) for s, sig in zip(sets, sigs)]
    undercounted = 0
    for i, x in enumerate(sets):
        for j, y in enumerate(sets[:i]):
            overlap = np.intersect1d(x, y).size
            folded = _bound(sigs[i], sigs[j], collided[i][0], 0, FOLD_WORDS)
            full = _bound(sigs[i], sigs[j], collided[i][1], FOLD_WORDS, FOLD_WORDS + SIG_WORDS)
            assert folded >= overlap and full >= overlap
            undercounted += full - collided[i][1] < overlap
    assert undercounted > 0  # without the collision term the full bound would have failed these pairs
