"""MONA: the weighted Jaccard against a hand computation, the prototype's order independence, the
distributed top-k against a global sort, and the method end to end through the select stage."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysel.config import S3Config
from raysel.core import paths
from raysel.core.features import FeatureStore, seeded_hash, top_k
from raysel.core.storage import Storage
from raysel.methods.mona import MonaConfig, mona_scores, prototype
from tests.conftest import store_table


def test_weighted_jaccard_equals_the_hand_computed_value():
    """Catches a score summed into the wrong row: an empty row between two others scores 0 and leaves
    theirs alone."""
    # mean-pool of x: feature 0 -> 1/2, feature 2 -> 4/2 = 2; prototype p = (1, 1, 1, 0)
    x = {"id": "x", "n_tokens": 2, "feats": {0: (1.0, 1.0), 2: (3.0, 4.0)}}
    y = {"id": "y", "n_tokens": 1, "feats": {1: (2.0, 2.0), 3: (5.0, 5.0)}}
    table = store_table([x, {"id": "empty", "n_tokens": 3, "feats": {}}, y])
    p = np.array([1.0, 1.0, 1.0, 0.0])
    # x: sum min = 0.5 + 0 + 1 + 0 = 1.5; sum max = 1 + 1 + 2 + 0 = 4. y: min 0 + 1 + 0 + 0, max 1 + 2 + 1 + 5
    assert mona_scores(table, p, MonaConfig(targets=["t"])) == pytest.approx([1.5 / 4, 0.0, 1 / 9])
    cosine = MonaConfig(targets=["t"], similarity="cosine")
    x_cos = (0.5 + 2.0) / (np.sqrt(0.25 + 4.0) * np.sqrt(3.0))
    assert mona_scores(table, p, cosine) == pytest.approx([x_cos, 0.0, 2.0 / (np.sqrt(4.0 + 25.0) * np.sqrt(3.0))])


def test_the_prototype_is_the_same_whatever_the_target_order():
    rng = np.random.default_rng(0)
    rows = [
        {
            "id": f"t{i}",
            "n_tokens": int(rng.integers(1, 50)),
            "feats": {int(j): (1.0, float(rng.gamma(2.0))) for j in rng.choice(64, 8, replace=False)},
        }
        for i in range(40)
    ]
    p = prototype(store_table(rows), 64)
    for seed in range(3):
        shuffled = [rows[i] for i in np.random.default_rng(seed + 1).permutation(len(rows))]
        assert np.array_equal(prototype(store_table(shuffled), 64), p)  # bit for bit
    by_hand = np.zeros(64)
    for r in rows:
        for j, (_, s) in r["feats"].items():
            by_hand[j] += float(np.float32(s)) / r["n_tokens"] / len(rows)
    np.testing.assert_allclose(p, by_hand, rtol=1e-12)


def test_the_top_k_merged_across_shards_equals_a_global_sort(ray_cluster, tmp_path):
    """Catches a merge that breaks ties by arrival instead of the ids' seeded hash, and a compaction
    (the driver keeps 4 k rows at most: here after the fifth shard) that drops a row still in the top k."""
    rng = np.random.default_rng(1)
    ids = np.array([f"s{i:04d}" for i in rng.permutation(500)], dtype=object)
    scores = np.round(rng.random(500), 1)  # many ties: they go by the ids' seeded hash
    (tmp_path / paths.FEATURES_DONE).mkdir(parents=True)
    for s, part in enumerate(np.array_split(np.arange(500), 9)):
        pq.write_table(
            pa.table({"id": ids[part].tolist(), "score": scores[part]}), tmp_path / paths.FEATURES / f"{s}.pq"
        )
        (tmp_path / paths.FEATURES_DONE / f"{s}.pq.json").write_text("{}")
    store = FeatureStore(Storage(str(tmp_path), S3Config()))
    merged = store.top_k(lambda t: t["score"].to_numpy(), 60, ["score"], seed=3)
    tie = dict(zip(ids.tolist(), seeded_hash(ids, 3).tolist()))
    expected = sorted(zip(ids.tolist(), scores.tolist()), key=lambda r: (-r[1], tie[r[0]]))[:60]
    assert list(zip(merged["id"].to_pylist(), merged["score"].to_pylist())) == expected
    assert top_k(ids, scores, 60, seed=3).equals(merged)


def test_mona_selects_the_top_scores_of_the_store(task_run):
    root, manifest, cfg = task_run
    mona = cfg.select.methods[0]
    storage = Storage(str(root), cfg.s3)
    targets = Storage(str(root / "targets"), cfg.s3)
    assert FeatureStore(targets).table().num_rows == 8
    d_sae = json.loads((root / "stats" / "summary.json").read_text())["d_sae"]
    pool = FeatureStore(storage).table()
    scores = mona_scores(pool, prototype(FeatureStore(targets).table(), d_sae), mona)
    tie = dict(zip(pool["id"].to_pylist(), seeded_hash(pool["id"].to_pylist(), 0).tolist()))  # select.seed 0
    expected = sorted(zip(pool["id"].to_pylist(), scores), key=lambda r: (-r[1], tie[r[0]]))[:10]
    selected = pq.read_table(root / "selection" / "mona" / "selected.parquet").to_pylist()
    assert [r["id"] for r in selected] == [i for i, _ in expected]
    np.testing.assert_allclose([r["score"] for r in selected], [s for _, s in expected])
    assert manifest["stages"]["select"]["budgets"] == {"mona": 10, "igds": 15, "coverage": 10}
