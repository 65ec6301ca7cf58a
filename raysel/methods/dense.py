"""Dense-embedding diversity: the baseline SAE-GreedSelect and SAE-SimScale are compared against.

SimScale's theta rule on dense vectors instead of activated sets: each sample is its hidden state
at the SAE's hook layer, mean-pooled over the positions the encoder pools (no padding, not BOS,
not the template's shared prefix), scaled to unit length. Samples are visited longest first (ties
by the ids' seeded hash); x is kept unless cos(x, y) >= theta for a kept y, and theta is binary-searched so that the
kept set reaches the budget, which is then cut at the budget (any subset of a dissimilar set is
dissimilar). The vectors come from the encode pass when it kept them (encode.keep_dense), else from
one forward pass of the pool up to the hook layer, on the encode actors; the filter holds n x d_in
floats on the driver: a baseline for pools of up to a few hundred thousand samples.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysel.core import paths
from raysel.core.encoder import Encoder
from raysel.core.features import seeded_hash
from raysel.core.models import tokenize
from raysel.core.ray_adapter import map_stage, model_resources
from raysel.core.sae import sae_metadata
from raysel.methods.base import Context, Method, MethodConfig, Picks, Pool

if TYPE_CHECKING:
    from raysel.config import ModelStack
    from raysel.core.features import FeatureStore
    from raysel.core.storage import Storage

log = logging.getLogger(__name__)


# Beside the n x d_in vectors (held twice while they arrive): the ids, lengths and visit order.
BYTES_PER_ROW = 200


class DenseConfig(MethodConfig):
    """The dense-embedding diversity baseline of the SAE-GreedSelect/SimScale paper: SimScale's θ rule on the cosine of
    each sample's hidden state at the SAE's hook layer, mean-pooled over the positions the encoder pools; longest
    first, θ binary-searched to reach the budget. The vectors are the encode pass's with `encode.keep_dense`, else one
    extra forward pass of the pool up to the hook, on the encode actors; n × d_in floats on the driver"""

    name: Literal["dense"] = "dense"


class Dense(Method):
    """`method: dense`: SimScale's theta rule on the cosine of mean-pooled hidden states."""

    Config = DenseConfig

    def driver_bytes(self, store: FeatureStore, k: int, ctx: Context) -> int:
        rows, d_in = store.summary()["n_samples"], sae_metadata(ctx.stack)["d_in"]
        return 4 * d_in * (2 * rows + k) + BYTES_PER_ROW * rows

    def pick(self, pool: Pool, k: int, ctx: Context) -> Picks:
        ids, vectors, source = mean_hidden_states(ctx.stack, ctx.storage, pool.ids)
        log.info("dense: %d vectors from %s", len(ids), source)
        encoded = np.isin(ids, pool.ids)  # not a sample the encoder rejected
        if not encoded.all():  # a copy of the vectors only when there is something to leave out
            ids, vectors = ids[encoded], vectors[encoded]
        lengths = pool.store.table(["id", "n_tokens"]).sort_by("id")
        n_tokens = lengths["n_tokens"].to_numpy()[np.searchsorted(lengths["id"].to_numpy(zero_copy_only=False), ids)]
        visit = np.lexsort((seeded_hash(ids, ctx.seed), -n_tokens))  # longest first, ties by the seeded hash
        kept, theta, passes = cosine_filter(vectors, visit, k)
        return Picks.unscored(ids[kept].tolist(), {"theta": theta, "theta_passes": passes, "vectors": source})


class MeanHidden:
    """Stage: rows (id, text) in, (id, vector) out (see mean_hidden)."""

    def __init__(self, stack: ModelStack):
        self.encoder = Encoder(stack)

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = mean_hidden(self.encoder, batch["text"].to_pylist())
        rows = pa.FixedSizeListArray.from_arrays(vectors.ravel(), vectors.shape[1])
        return pa.table({"id": batch["id"], "vector": rows})


def mean_hidden(encoder: Encoder, texts: list[str]) -> np.ndarray:
    """Each text's hidden state at the hook, mean-pooled over the positions the encoder pools, unit length."""
    seqs = tokenize(encoder.tokenizer, texts, truncation=True, max_length=encoder.max_tokens)["input_ids"]
    out = np.zeros((len(texts), encoder.sae.cfg.d_in), np.float32)
    for bucket in encoder.length_buckets(seqs):
        with encoder.torch.inference_mode():
            out[bucket] = encoder.unit_means(*encoder.hidden_states([seqs[i] for i in bucket]))
    return out


def mean_hidden_states(stack: ModelStack, storage: Storage, pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Every pool sample's unit mean hidden state at the hook: (ids sorted, n x d_in float32, where they came
    from). The encode pass's, when it kept them (encode.keep_dense) for every `pooled` id; else a pass of its own."""
    import ray

    kept = storage.exists(paths.DENSE) and pq.read_table(storage.path(paths.DENSE), filesystem=storage.fs)
    if kept and np.isin(pooled, kept["id"].to_numpy(zero_copy_only=False)).all():
        table, source = kept, "the encode pass"
    else:
        texts = pq.read_table(storage.path(paths.PREPARED), columns=["id", "text"], filesystem=storage.fs)
        out = map_stage(
            ray.data.from_arrow(texts), MeanHidden, model_resources(stack.encode, stack.encode.actors, 64), stack=stack
        )
        table, source = pa.concat_tables(ray.get(out.to_arrow_refs())), "a pass of its own"
    table = table.rename_columns(["id", "vector"])
    ids = np.asarray(table["id"].to_pylist(), dtype=object)
    order = np.argsort(ids, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(ids))
    # each block's vectors straight into their sorted rows (rank is a permutation: every row is written), so
    # the driver holds them twice at most, not four times as a sort, a list of arrays and a stack would
    vectors, at = np.empty((len(ids), table.schema.field("vector").type.list_size), np.float32), 0
    for chunk in table["vector"].chunks:
        vectors[rank[at : at + len(chunk)]] = chunk.flatten().to_numpy().reshape(len(chunk), -1)
        at += len(chunk)
    return ids[order], vectors, source


def cosine_filter(
    vectors: np.ndarray, visit: np.ndarray, budget: int, precision: float = 1e-4
) -> tuple[np.ndarray, float, int]:
    """Rows kept (in visit order, at most `budget`), the smallest theta whose pass keeps `budget`, and
    the passes the search ran. Unit vectors: the cosine is the dot product."""
    budget = min(budget, len(visit))
    lo, hi, passes = -1.0, 1.0 + precision, 1  # above 1 no cosine reaches theta: every sample is kept
    best = _keep_dissimilar(vectors, visit, hi, budget)
    while hi - lo > precision:
        mid = (lo + hi) / 2
        kept = _keep_dissimilar(vectors, visit, mid, budget)
        passes += 1
        if len(kept) >= budget:
            hi, best = mid, kept
        else:
            lo = mid
    return best, round(hi, 6), passes


def _keep_dissimilar(vectors: np.ndarray, visit: np.ndarray, theta: float, budget: int) -> np.ndarray:
    """One pass: the rows whose cosine to every row kept before them is below theta, stopping at budget."""
    kept = np.empty((budget, vectors.shape[1]), np.float32)
    rows: list[int] = []
    for i in visit:
        if rows and float((kept[: len(rows)] @ vectors[i]).max()) >= theta:
            continue
        kept[len(rows)] = vectors[i]
        rows.append(int(i))
        if len(rows) == budget:
            break
    return np.array(rows, dtype=np.int64)
