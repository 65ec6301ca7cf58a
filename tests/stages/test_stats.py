"""Feature statistics on a real local Ray cluster against a dense numpy reference."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from raysel.core.features import ACTIVATED_SCHEMA
from raysel.stages.stats import compute_stats, stats_part, to_table


def random_store(seed: int, n: int = 120, d_sae: int = 40, blocks: int = 4, ties: bool = False):
    """A sparse store in several blocks, and its dense max- and sum-pools (with `ties`, whole numbers,
    most features' top values tying across blocks, and the blocks in descending id order: a later block's
    tied entries must win)."""
    rng = np.random.default_rng(seed)
    values = np.ceil(rng.gamma(2.0, 1.0, (n, d_sae))) if ties else rng.gamma(2.0, 1.0, (n, d_sae))
    dense_max = np.where(rng.random((n, d_sae)) < 0.15, values, 0.0).astype(np.float32)
    dense_max[:, 7] = 0  # a feature that never fires
    dense_sum = dense_max * rng.integers(1, 5, (n, d_sae))
    rows = []
    for i in range(n):
        nz = np.flatnonzero(dense_max[i])
        rows.append(
            {
                "id": f"s{i:03d}",
                "n_tokens": 10,
                "feat_ids": nz.astype(np.int32).tolist(),
                "feat_max": dense_max[i, nz].tolist(),
                "feat_sum": dense_sum[i, nz].tolist(),
            }
        )
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("n_tokens", pa.int32()),
            ("feat_ids", pa.list_(pa.int32())),
            ("feat_max", pa.list_(pa.float32())),
            ("feat_sum", pa.list_(pa.float32())),
        ]
    )
    tables = [pa.Table.from_pylist(part, schema=schema) for part in np.array_split(rows, blocks)[:: -1 if ties else 1]]
    return ray.data.from_arrow(tables), dense_max, dense_sum.astype(np.float32)


def stats_and_activated(ds, d_sae: int, tau: float, top_n: int):
    """compute_stats, and the activated sets it writes, read back sorted by id."""
    sink = pa.BufferOutputStream()
    # block by block, as the stage merges them (the stage maps them on the cluster: test_select_streamed)
    parts = (stats_part(t, d_sae, tau, top_n) for t in ds.iter_batches(batch_format="pyarrow", batch_size=None))
    with pq.ParquetWriter(sink, ACTIVATED_SCHEMA) as writer:
        stats = compute_stats(parts, d_sae, top_n, writer)
    return stats, pq.read_table(pa.BufferReader(sink.getvalue())).sort_by("id")


@pytest.mark.parametrize("seed, ties", [(0, False), (1, False), (2, True)])
def test_stats_match_a_numpy_reference(ray_cluster, seed, ties):
    """With ties, catches a merge that turns away a block's entries equal to a feature's current top_n-th
    value: the smaller id among equal values must win."""
    ds, g, s = random_store(seed, ties=ties)
    tau, top_n = 1.0, 5
    stats, activated = stats_and_activated(ds, d_sae=g.shape[1], tau=tau, top_n=top_n)
    table = to_table(stats).to_pylist()
    active = g > tau
    # the sets select reads: every sample once, its features above tau (a wrong cut or a row shifted between
    # blocks shows here)
    assert activated["id"].to_pylist() == [f"s{i:03d}" for i in range(g.shape[0])]
    assert activated["feats"].to_pylist() == [np.flatnonzero(row).tolist() for row in active]
    for j, row in enumerate(table):
        assert row["feature"] == j
        assert row["doc_freq"] == active[:, j].sum()
        assert row["mass"] == pytest.approx(s[:, j].sum(), rel=1e-5)
        assert row["max"] == pytest.approx(g[:, j].max(), rel=1e-6)
        expected_mean = g[active[:, j], j].mean() if active[:, j].any() else 0.0
        assert row["mean_active"] == pytest.approx(expected_mean, rel=1e-5)
        fired = np.flatnonzero(g[:, j] > 0)
        best = sorted(fired, key=lambda i: (-g[i, j], i))[:top_n]
        assert row["top_ids"] == [f"s{i:03d}" for i in best]
        np.testing.assert_allclose(row["top_values"], g[best, j], rtol=1e-6)
    assert table[7]["doc_freq"] == 0 and table[7]["top_ids"] == []


def test_feature_id_beyond_d_sae_is_an_error(ray_cluster):
    ds, g, _ = random_store(0)
    with pytest.raises(Exception, match="out of range for d_sae 10"):
        stats_and_activated(ds, d_sae=10, tau=0.0, top_n=3)


def test_a_tau_float32_cannot_hold_counts_the_same_entries_in_stats_and_sets(ray_cluster):
    """Catches the statistics comparing in float32 (numpy rounds the Python tau 0.1 to float32(0.1) first)
    while the activated sets compare in float64: an entry equal to float32(0.1) then counts in one only."""
    ds, g, _ = random_store(0)
    ds = ds.map_batches(
        lambda t: t.set_column(
            3,
            "feat_max",
            pa.array([[np.float32(0.1)] * len(v) for v in t["feat_max"].to_pylist()], pa.list_(pa.float32())),
        ),
        batch_format="pyarrow",
    )
    stats, activated = stats_and_activated(ds, d_sae=g.shape[1], tau=0.1, top_n=3)
    stored = int((g > 0).sum())
    assert stats.doc_freq.sum() == sum(len(f) for f in activated["feats"].to_pylist()) == stored  # 0.1f > 0.1
