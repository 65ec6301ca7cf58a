"""k-center greedy against a dense reference written the obvious way, and on planted clusters."""

import numpy as np
import pytest

from raysel.core.features import csr_by_id, pooled_lists
from raysel.methods.kcenter_kernel import first_of_max, k_center_greedy, unit_rows
from tests.conftest import store_table


def random_store(n: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        feats = rng.choice(d, size=int(rng.integers(0, 8)), replace=False)
        rows.append(
            {
                "id": f"s{i:04d}",
                "n_tokens": int(rng.integers(1, 30)),
                "feats": {int(j): (float(rng.gamma(2.0)), float(rng.gamma(3.0))) for j in feats},
            }
        )
    return store_table(rows)


def dense_reference(table, pooling: str, normalize: bool, k: int, start: int):
    """Dense vectors, full distance matrix, min over the picks, argmax: no sparse tricks."""
    n, d = table.num_rows, 64
    x = np.zeros((n, d))
    for i, r in enumerate(table.to_pylist()):
        values = r["feat_max"] if pooling == "max" else r["feat_sum"]
        for j, v in zip(r["feat_ids"], values):
            x[i, j] = float(np.float32(v)) / (r["n_tokens"] if pooling == "mean" else 1)
    if normalize:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms > 0, norms, 1.0)
    order, radii = [start], [np.inf]
    for _ in range(k - 1):
        dist = np.min(np.linalg.norm(x[:, None, :] - x[None, order, :], axis=2), axis=1)
        dist[order] = -1.0
        order.append(first_of_max(dist))  # ties (up to rounding) to the earlier sample, as the method
        radii.append(dist[order[-1]])
    return order, radii


@pytest.mark.parametrize("pooling, normalize", [("mean", True), ("sum", False), ("max", True)])
def test_k_center_equals_the_dense_reference(pooling, normalize):
    table = random_store(150, 64, seed=3)
    # read as the store is, in blocks of uneven sizes and in no id order: each row lands at its id's rank
    blocks = [pooled_lists(table.slice(*span), pooling) for span in [(44, 106), (0, 41), (41, 3)]]
    _, indptr, feats, values = csr_by_id(lambda: blocks, ("feats", "values"))
    if normalize:
        unit_rows(indptr, values)
    order, radii = k_center_greedy(indptr, feats, values, 25, start=7)
    ref_order, ref_radii = dense_reference(table, pooling, normalize, 25, start=7)
    assert order.tolist() == ref_order
    np.testing.assert_allclose(radii[1:], ref_radii[1:], rtol=1e-6, atol=1e-9)


def test_k_center_takes_one_sample_from_each_planted_cluster_first():
    rng = np.random.default_rng(0)
    centers = {0: [0, 1, 2], 1: [10, 11, 12], 2: [20, 21, 22]}  # three disjoint directions
    rows = []
    for i in range(60):
        c = i % 3
        rows.append(
            {
                "id": f"s{i:03d}",
                "n_tokens": 1,
                "feats": {j: (1.0, 1.0 + 0.05 * float(rng.random())) for j in centers[c]},
            }
        )
    table = store_table(rows)
    _, indptr, feats, values = csr_by_id(lambda: [pooled_lists(table, "sum")], ("feats", "values"))
    unit_rows(indptr, values)
    order, radii = k_center_greedy(indptr, feats, values, 5, start=0)
    assert {int(i) % 3 for i in order[:3]} == {0, 1, 2}  # the first three cover every cluster
    assert radii[3] < 0.1 < radii[2]  # after that, every sample is near a pick


def test_ties_up_to_rounding_go_to_the_smallest_hash_not_the_earlier_id():
    """Would catch a tie settled by the row (where an id sorts: one source's samples first), or a
    near-maximum that is not a tie taken for one."""
    assert first_of_max(np.array([1.0, 2.0 - 1e-15, 2.0, 0.5])) == 1
    assert first_of_max(np.array([1.0, 2.0 - 1e-15, 2.0, 0.5]), np.array([0, 9, 4, 1], np.uint64)) == 2
    assert first_of_max(np.array([1.0, 1.9, 2.0]), np.array([0, 0, 5], np.uint64)) == 2
    # six disjoint unit vectors all lie sqrt(2) apart: after the first pick, every pick is a tie
    indptr, feats, values = np.arange(7, dtype=np.int64), np.arange(6, dtype=np.int32), np.ones(6)
    tie = np.array([50, 40, 30, 20, 10, 60], np.uint64)
    assert k_center_greedy(indptr, feats, values, 6, 5, tie)[0].tolist() == [5, 4, 3, 2, 1, 0]
    assert k_center_greedy(indptr, feats, values, 6, 5)[0].tolist() == [5, 0, 1, 2, 3, 4]
