"""The feature store, read: one encoded set's sparse pooled features, and the single home of the
rule that says when a feature counts as activated in a sample.

A feature j is activated in x when its max-pool exceeds tau: A(x) = {j : g_j(x) > tau}. One tau
serves the statistics and every selection method, so a feature's document frequency and the
sets greedy covers agree.

Each row of the store:

    id        string
    n_tokens  int32            tokens pooled over
    feat_ids  list<int32>      ascending
    feat_max  list<float32>    max-pool g(x) of each listed feature
    feat_sum  list<float32>    sum-pool s(x); the mean-pool is feat_sum / n_tokens
"""

from __future__ import annotations

import json
import logging
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysel.core import paths
from raysel.core.storage import Storage

log = logging.getLogger(__name__)

FEATURE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("n_tokens", pa.int32()),
        ("feat_ids", pa.list_(pa.int32())),
        ("feat_max", pa.list_(pa.float32())),
        ("feat_sum", pa.list_(pa.float32())),
    ]
)


def is_active(max_pool, tau: float):
    """The activation rule, for an array of max-pooled values (numpy or arrow)."""
    if isinstance(max_pool, np.ndarray):
        return max_pool > tau
    return pc.greater(max_pool, tau)


def activated_entries(table: pa.Table, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, feature, max-pool) of every activated entry of a feature-store table."""
    keep = is_active(pc.list_flatten(table["feat_max"]), tau)
    rows = pc.list_parent_indices(table["feat_ids"]).filter(keep).to_numpy()
    feats = pc.list_flatten(table["feat_ids"]).filter(keep).to_numpy().astype(np.int64)
    values = pc.list_flatten(table["feat_max"]).filter(keep).to_numpy().astype(np.float64)
    return rows, feats, values


def activation_profile(table: pa.Table, tau: float, d_sae: int) -> tuple[np.ndarray, np.ndarray]:
    """Per feature: the share of the table's samples activating it, and its max activation."""
    values = pc.list_flatten(table["feat_max"]).to_numpy().astype(np.float64)
    feats = pc.list_flatten(table["feat_ids"]).to_numpy().astype(np.int64)
    share = np.bincount(feats[is_active(values, tau)], minlength=d_sae) / max(table.num_rows, 1)
    peak = np.zeros(d_sae)
    np.maximum.at(peak, feats, values)
    return share, peak


def pooled(table: pa.Table, pooling: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row of each entry, feature ids, values) of a feature-store table, flattened: the sum-pool s(x),
    the mean-pool s(x) / n_tokens, or the max-pool g(x)."""
    rows = pc.list_parent_indices(table["feat_ids"]).to_numpy()
    feats = pc.list_flatten(table["feat_ids"]).to_numpy().astype(np.int64)
    column = "feat_max" if pooling == "max" else "feat_sum"
    values = pc.list_flatten(table[column]).to_numpy().astype(np.float64)
    if pooling == "mean":
        values = values / np.maximum(table["n_tokens"].to_numpy(), 1)[rows]
    return rows, feats, values


def calibrate_tau(feat_max: np.ndarray, n_samples: int, target_active: float) -> float:
    """The tau at which samples have `target_active` activated features on average.

    Activated entries are those above tau, so tau is the value below the
    (n_samples * target_active) largest max-pools of the whole store."""
    k = int(round(n_samples * target_active))
    if k >= feat_max.size:
        return 0.0
    return float(np.partition(feat_max, feat_max.size - k - 1)[feat_max.size - k - 1])


def top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> pa.Table:
    """The k best (id, score), highest score first, ties to the smaller id."""
    order = np.lexsort((ids, -scores))[:k]
    return pa.table({"id": pa.array(ids[order], pa.string()), "score": pa.array(scores[order], pa.float64())})


def distributed_top_k(ds, score_block, k: int) -> pa.Table:
    """score_block(table) -> scores, over every block of a Ray Dataset; each block sends back its own
    top k only, and they are merged here."""
    import ray

    def block_top(table: pa.Table) -> pa.Table:
        return top_k(np.asarray(table["id"].to_pylist(), dtype=object), score_block(table), k)

    tops = ds.map_batches(block_top, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    merged = pa.concat_tables(ray.get(tops)) if tops else pa.table({"id": [], "score": []})
    return top_k(np.asarray(merged["id"].to_pylist(), dtype=object), merged["score"].to_numpy(), k)


class FeatureStore:
    """The committed feature store of one encoded set (the run's input, or a side set) under its root."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def done_shards(self) -> dict[str, dict]:
        """The shard markers, by shard name."""
        markers = {}
        for info in self.storage.listing(paths.FEATURES_DONE):
            if not info.path.endswith(".json"):  # a local marker caught mid-write, before its rename
                continue
            with self.storage.fs.open_input_stream(info.path) as f:
                markers[posixpath.basename(info.path).removesuffix(".json")] = json.loads(f.read())
        return markers

    def shard_paths(self) -> list[str]:
        """The shards that have a completion marker."""
        return [self.storage.path(paths.FEATURES, s) for s in sorted(self.done_shards())]

    def dataset(self):
        """The store as a Ray Dataset, for passes spread over the cluster."""
        import ray

        return ray.data.read_parquet(self.shard_paths(), filesystem=self.storage.fs)

    def table(self, columns: list[str] | None = None, ids: list[str] | None = None) -> pa.Table:
        """The store (or the rows of `ids`) read on this process, sorted by id when it is read."""
        filters = pc.field("id").isin(sorted(ids)) if ids is not None else None
        table = pq.ParquetDataset(self.shard_paths(), filesystem=self.storage.fs, filters=filters).read(columns=columns)
        # a fixed order, whatever the shard layout: ties break by id
        return table.sort_by("id") if "id" in table.column_names else table

    def counts(self) -> tuple[int, int]:
        """(rows, stored features) of the committed shards, from their parquet footers alone."""
        rows = stored = 0
        for path in self.shard_paths():
            meta = pq.ParquetFile(path, filesystem=self.storage.fs).metadata
            rows += meta.num_rows
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                stored += sum(
                    group.column(c).num_values
                    for c in range(group.num_columns)
                    if group.column(c).path_in_schema == "feat_ids.list.element"
                )
        return rows, stored

    def top_k(self, score_block, k: int) -> pa.Table:
        """The k best (id, score) of the store by score_block(table) -> scores, in one pass on the cluster."""
        return distributed_top_k(self.dataset(), score_block, k)

    def activated_sets(self, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids, and A(x) of every sample in CSR form (indptr, indices), sorted by id."""
        table = self.table(["id", "feat_ids", "feat_max"])
        rows, feats, _ = activated_entries(table, tau)
        indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=table.num_rows))]
        return np.asarray(table["id"].to_pylist(), dtype=object), indptr, feats

    def resolve_tau(self, tau: float, target_active: float | None) -> float:
        """`tau`, or the one calibrated so that samples average `target_active` activated features."""
        if not target_active:
            return tau
        table = self.table(["feat_max"])
        tau = calibrate_tau(pc.list_flatten(table["feat_max"]).to_numpy(), table.num_rows, target_active)
        log.info("activation: tau %g gives %g activated features per sample on average", tau, target_active)
        return tau

    def summary(self) -> dict:
        """The statistics' summary: n_samples, d_sae, tau, ..."""
        return self.storage.read_json(paths.STATS_SUMMARY)
