"""Which features count as activated in a sample: A(x) = {j : g_j(x) > tau}, with g
the max-pool. One tau serves the statistics and every selection method, so a
feature's document frequency and the sets greedy covers agree."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysel.config import RunConfig
from raysel.encode import feature_paths
from raysel.storage import Storage

log = logging.getLogger(__name__)


def calibrate_tau(feat_max: np.ndarray, n_samples: int, target_active: float) -> float:
    """The tau at which samples have `target_active` activated features on average.

    Activated entries are those above tau, so tau is the value below the
    (n_samples * target_active) largest max-pools of the whole store."""
    k = int(round(n_samples * target_active))
    if k >= feat_max.size:
        return 0.0
    return float(np.partition(feat_max, feat_max.size - k - 1)[feat_max.size - k - 1])


def resolve_tau(storage: Storage, cfg: RunConfig) -> float:
    """activation.tau, or the calibrated one when activation.target_active is set (one column of the store read)."""
    if not cfg.activation.target_active:
        return cfg.activation.tau
    table = pq.ParquetDataset(feature_paths(storage), filesystem=storage.fs).read(columns=["feat_max"])
    tau = calibrate_tau(pc.list_flatten(table["feat_max"]).to_numpy(), table.num_rows, cfg.activation.target_active)
    log.info("activation: tau %g gives %g activated features per sample on average", tau, cfg.activation.target_active)
    return tau


def activated_sets(storage: Storage, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, and A(x) of every sample in CSR form (indptr, indices), sorted by id."""
    table = pq.ParquetDataset(feature_paths(storage), filesystem=storage.fs).read(columns=["id", "feat_ids", "feat_max"])
    table = table.sort_by("id")  # a fixed order, whatever the shard layout: ties break by id
    keep = pc.greater(pc.list_flatten(table["feat_max"]), tau)
    feats = pc.list_flatten(table["feat_ids"]).filter(keep).to_numpy().astype(np.int64)
    rows = pc.list_parent_indices(table["feat_ids"]).filter(keep).to_numpy()
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=table.num_rows))]
    return np.asarray(table["id"].to_pylist(), dtype=object), indptr, feats


def pooled(table: pa.Table, pooling: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row of each entry, feature ids, values) of a feature-store table, flattened: the sum-pool s(x),
    or the mean-pool s(x) / n_tokens."""
    rows = pc.list_parent_indices(table["feat_ids"]).to_numpy()
    feats = pc.list_flatten(table["feat_ids"]).to_numpy().astype(np.int64)
    values = pc.list_flatten(table["feat_sum"]).to_numpy().astype(np.float64)
    if pooling == "mean":
        values = values / np.maximum(table["n_tokens"].to_numpy(), 1)[rows]
    return rows, feats, values
