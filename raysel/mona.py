"""MONA: score every pool sample by its similarity to the target task's prototype.

m(x) is a sample's mean-pooled SAE vector (feat_sum / n_tokens), p the mean of
m(t) over the target examples, and the score the weighted Jaccard
J(x) = sum_j min(m_j, p_j) / sum_j max(m_j, p_j). m(x) is sparse and p dense,
so J costs O(nnz(x)): outside x's features the max is p_j, summed once as
P = sum_j p_j. Scoring is one streaming pass over the feature store with Ray
Data; each block keeps only its own top k, and the driver merges those.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from raysel.activation import pooled
from raysel.config import MonaConfig


def prototype(targets: pa.Table, d_sae: int, pooling: str = "mean") -> np.ndarray:
    """The mean of the targets' pooled vectors: a dense d_sae vector, the same whatever their order."""
    rows, feats, values = pooled(targets, pooling)
    order = np.lexsort((values, feats))  # a fixed summation order, so the prototype is bit-for-bit stable
    return np.bincount(feats[order], values[order], minlength=d_sae) / max(targets.num_rows, 1)


def weighted_jaccard(rows, feats, values, n_rows: int, p: np.ndarray) -> np.ndarray:
    pj = p[feats]
    low = np.bincount(rows, np.minimum(values, pj), minlength=n_rows)
    high = p.sum() - np.bincount(rows, pj, minlength=n_rows) + np.bincount(rows, np.maximum(values, pj), minlength=n_rows)
    return np.divide(low, high, out=np.zeros(n_rows), where=high > 0)


def cosine(rows, feats, values, n_rows: int, p: np.ndarray) -> np.ndarray:
    dot = np.bincount(rows, values * p[feats], minlength=n_rows)
    norms = np.sqrt(np.bincount(rows, values * values, minlength=n_rows)) * np.linalg.norm(p)
    return np.divide(dot, norms, out=np.zeros(n_rows), where=norms > 0)


def mona_scores(table: pa.Table, p: np.ndarray, cfg: MonaConfig) -> np.ndarray:
    similarity = weighted_jaccard if cfg.similarity == "jaccard" else cosine
    return similarity(*pooled(table, cfg.pooling), table.num_rows, p)


def top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> pa.Table:
    """The k best (id, score), highest score first, ties to the smaller id."""
    order = np.lexsort((ids, -scores))[:k]
    return pa.table({"id": pa.array(ids[order], pa.string()), "score": pa.array(scores[order], pa.float64())})


def distributed_top_k(ds: ray.data.Dataset, score_block, k: int) -> pa.Table:
    """score_block(table) -> scores, over every block of `ds`; each block sends back its own top k only."""
    def block_top(table: pa.Table) -> pa.Table:
        return top_k(np.asarray(table["id"].to_pylist(), dtype=object), score_block(table), k)

    tops = ds.map_batches(block_top, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    merged = pa.concat_tables(ray.get(tops)) if tops else pa.table({"id": [], "score": []})
    return top_k(np.asarray(merged["id"].to_pylist(), dtype=object), merged["score"].to_numpy(), k)
