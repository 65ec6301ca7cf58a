"""MONA: score every pool sample by its similarity to the target task's prototype.

m(x) is a sample's mean-pooled SAE vector (feat_sum / n_tokens), p the mean of
m(t) over the target examples, and the score the weighted Jaccard
J(x) = sum_j min(m_j, p_j) / sum_j max(m_j, p_j). m(x) is sparse and p dense,
so J costs O(nnz(x)): outside x's features the max is p_j, summed once as
P = sum_j p_j. Scoring is one streaming pass over the feature store, a Ray task
a shard (FeatureStore.top_k).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from raysel.core.features import pooled, pooled_columns
from raysel.methods.base import Context, Method, MethodConfig, Picks, Pool

if TYPE_CHECKING:
    from raysel.core.fac import FACConfig


class MonaConfig(MethodConfig):
    """The samples most similar to the targets' mean-pooled prototype"""

    name: Literal["mona"] = "mona"
    targets: list[str] = Field(min_length=1)
    """target-task examples (files, globs, `s3://`), read like the input and encoded with the same model and SAE into
    `<output.root>/targets/`"""
    pooling: Literal["mean", "sum"] = "mean"
    """`mean` (the paper's) or `sum` (for ablation): how the targets' prototype and the samples are pooled"""
    similarity: Literal["jaccard", "cosine"] = "jaccard"
    """`jaccard`: weighted Jaccard to the prototype; or `cosine`"""


class Mona(Method):
    Config = MonaConfig
    ranks_by_score = True

    def side_inputs(self, fac: FACConfig) -> dict[str, list[str]]:
        return {"targets": self.cfg.targets}

    def pick(self, pool: Pool, k: int, ctx: Context) -> Picks:
        p = prototype(ctx.side_set("targets", self.cfg.targets).table(), ctx.d_sae, self.cfg.pooling)
        score = functools.partial(mona_scores, p=p, cfg=self.cfg)
        top = pool.store.top_k(score, k, pooled_columns(self.cfg.pooling), ctx.seed)
        return Picks(
            top["id"].to_pylist(), top["score"].to_numpy(), {"prototype_active_features": int(np.count_nonzero(p))}
        )


def prototype(targets: pa.Table, d_sae: int, pooling: str = "mean") -> np.ndarray:
    """The mean of the targets' pooled vectors: a dense d_sae vector, the same whatever their order."""
    rows, feats, values = pooled(targets, pooling)
    order = np.lexsort((values, feats))  # a fixed summation order, so the prototype is bit-for-bit stable
    return np.bincount(feats[order], values[order], minlength=d_sae) / max(targets.num_rows, 1)


def mona_scores(table: pa.Table, p: np.ndarray, cfg: MonaConfig) -> np.ndarray:
    """Each row's weighted Jaccard (or cosine) to the prototype p."""
    from raysel.methods.mona_kernel import row_sums  # numba, loaded where the scores are computed

    rows, feats, values = pooled(table, cfg.pooling)
    jaccard = cfg.similarity == "jaccard"
    a, b, c = row_sums(rows, feats, values, p, table.num_rows, jaccard)
    if jaccard:  # sum min / (P - sum of p over x's features + sum max)
        bottom = p.sum() - b + c
    else:  # dot / (|m(x)| |p|)
        bottom = np.sqrt(b) * np.linalg.norm(p)
    return np.divide(a, bottom, out=np.zeros(table.num_rows), where=bottom > 0)
