"""Top-activating spans: what each feature responds to, in the model's own tokens.

They come from the encode pass itself, never from a second pass of the model. While a shard is
encoded, the encoder keeps, per feature, the TOP samples where it is strongest: where it peaks and
its activation on every token of the window of up to WINDOW tokens around the peak
(`TopSpans`, one features/_spans/ file per shard, committed with the shard). `find_spans`
reduces the shards' candidates to each feature's TOP and decodes the windows' tokens from the
prepared texts. They feed feature descriptions, FAC's synthesis prompts and the report.

One row per (feature, sample), strongest first per feature:

    feature  int32     the SAE feature
    rank     int32     1 = the sample where the feature is strongest
    id       string    the sample
    value    float32   the feature's max over the sample (equals the stored max-pool)
    tokens   list<string>   the window's tokens, decoded one by one
    acts     list<float32>  the feature's activation on each of them
    peak     int32     index in the window of the max-activating token (the first, on a tie)

The spans stage (stages/spans.py) keeps those of the features the report shows; FAC keeps the
missing features' spans in the anchor, and its judge reads the shortlist's.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysel.core import paths
from raysel.core.models import load_tokenizer, tokenize
from raysel.core.storage import Storage

if TYPE_CHECKING:
    from raysel.core.encoder import ModelStack

log = logging.getLogger(__name__)

WINDOW = 32
TOP = 10  # samples kept per feature
SPAN_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("rank", pa.int32()),
        ("id", pa.string()),
        ("value", pa.float32()),
        ("tokens", pa.list_(pa.string())),
        ("acts", pa.list_(pa.float32())),
        ("peak", pa.int32()),
    ]
)
# A shard's candidates: its TOP samples per feature. `start` and `length` place the window in the
# sample's token ids; only the window's non-zero activations are stored (at `act_at`).
CANDIDATE_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("id", pa.string()),
        ("value", pa.float32()),
        ("start", pa.int32()),
        ("length", pa.int32()),
        ("peak", pa.int32()),
        ("act_at", pa.list_(pa.int8())),
        ("act", pa.list_(pa.float32())),
    ]
)
COLUMNS = ("feature", "sample", "value", "start", "length", "peak", "acts")


def window(peak, length, width: int = WINDOW):
    """[lo, hi) of up to `width` positions around `peak` inside [0, length), shifted rather than cut
    at an edge; elementwise on torch tensors."""
    import torch

    lo = torch.minimum(peak - width // 2 + 1, length - width).clamp(min=0)
    return lo, torch.minimum(length, lo + width)


def batch_spans(entries, feat_max, n_counted, first) -> dict[str, np.ndarray]:
    """One forward batch's span candidates: per feature its TOP samples of the batch, each with the
    feature's peak and its activations on the window around it.

    entries: (sample, token, feature, value) of every non-zero activation, tokens numbered over the
    batch's counted positions; feat_max: samples x d_sae max-pools (0 where a feature is not kept);
    n_counted: counted positions per sample; first: the sample's first counted position in its ids."""
    import torch

    sample, token, feature, value = entries
    n, d = feat_max.shape
    best, rows = feat_max.topk(min(TOP, n), dim=0)
    cols = torch.arange(d, device=feat_max.device).expand_as(rows)
    kept = best > 0
    best, rows, cols = best[kept], rows[kept], cols[kept]
    slot = torch.full((n * d,), -1, dtype=torch.long, device=feat_max.device)
    slot[rows * d + cols] = torch.arange(len(rows), device=feat_max.device)
    at = slot[sample * d + feature]
    mine = at >= 0
    at, token, value = at[mine], token[mine], value[mine]
    offset = (torch.cumsum(n_counted, 0) - n_counted)[rows]  # where each candidate's sample starts
    peak = torch.full_like(best, n_counted.sum().item(), dtype=torch.long)
    top = value == best[at]
    peak.scatter_reduce_(0, at[top], token[top], "amin")  # the first position that reaches the max
    peak -= offset
    lo, hi = window(peak, n_counted[rows])
    inside = (token >= offset[at] + lo[at]) & (token < offset[at] + hi[at])
    acts = torch.zeros(len(rows), WINDOW, dtype=torch.float32, device=feat_max.device)
    acts[at[inside], token[inside] - offset[at[inside]] - lo[at[inside]]] = value[inside].float()
    found = (cols, rows, best.float(), first.to(feat_max.device)[rows] + lo, hi - lo, peak - lo, acts)
    return {k: v.cpu().numpy() for k, v in zip(COLUMNS, found)}


class TopSpans:
    """Per feature, the TOP strongest samples of the batches added so far, with their windows. A
    sample added twice (an encode retried after a failure) is kept once."""

    COMPACT = 1 << 18  # candidates buffered before they are reduced to each feature's TOP

    def __init__(self):
        self.parts: list[dict[str, np.ndarray]] = []
        self.rows = self.kept = 0

    def add(self, ids: np.ndarray, found: dict[str, np.ndarray]) -> None:
        self.parts.append({**found, "sample": ids[found["sample"]]})
        self.rows += len(found["value"])
        if self.rows > max(self.COMPACT, 2 * self.kept):
            self._compact()

    def _compact(self) -> dict[str, np.ndarray]:
        if not self.parts:
            return {k: np.zeros((0, WINDOW) if k == "acts" else 0) for k in COLUMNS}
        c = {k: np.concatenate([p[k] for p in self.parts]) for k in COLUMNS}
        _, code = np.unique(c["sample"].astype(str), return_inverse=True)  # codes sort as the ids do
        order = np.lexsort((code, -c["value"], c["feature"]))
        c = {k: v[order] for k, v in c.items()}
        code, feature = code[order], c["feature"]
        repeat = np.r_[False, (feature[1:] == feature[:-1]) & (code[1:] == code[:-1])]
        c = {k: v[~repeat] for k, v in c.items()}
        c = {k: v[rank_within(c["feature"]) <= TOP] for k, v in c.items()}
        self.parts, self.rows = [c], len(c["value"])
        self.kept = self.rows  # what the next compaction must at least double
        return c

    def table(self) -> pa.Table:
        c = self._compact()
        nonzero = c["acts"] > 0
        offsets = pa.array(np.r_[0, np.cumsum(nonzero.sum(1))].astype(np.int32))
        where = np.nonzero(nonzero)[1].astype(np.int8)
        columns = [c["feature"], c["sample"].astype(str), c["value"], c["start"], c["length"], c["peak"]]
        return pa.Table.from_arrays(
            [pa.array(col) for col in columns]
            + [
                pa.ListArray.from_arrays(offsets, pa.array(where)),
                pa.ListArray.from_arrays(offsets, c["acts"][nonzero]),
            ],
            schema=CANDIDATE_SCHEMA,
        )


def find_spans(stack: ModelStack, storage: Storage, features: list[int]) -> pa.Table:
    """Spans of `features` in the encoded set at `storage`: the shards' candidates reduced to each
    feature's TOP, ranked strongest first, with the windows' tokens decoded. Writes nothing."""
    start = time.time()
    wanted = pa.array(sorted(set(features)), pa.int32())
    found = pq.ParquetDataset(
        storage.path(paths.SPAN_CANDIDATES), filesystem=storage.fs, filters=pc.field("feature").isin(wanted)
    ).read()
    found = found.sort_by([("feature", "ascending"), ("value", "descending"), ("id", "ascending")])
    rank = rank_within(found["feature"].to_numpy())
    found, rank = found.filter(pa.array(rank <= TOP)), rank[rank <= TOP]
    if not found.num_rows:
        return SPAN_SCHEMA.empty_table()
    ids = pc.unique(found["id"])
    texts = pq.ParquetDataset(
        storage.path(paths.PREPARED), filesystem=storage.fs, filters=pc.field("id").isin(ids)
    ).read(columns=["id", "text"])
    tokenizer = load_tokenizer(stack.model)
    seqs = tokenize(tokenizer, texts["text"].to_pylist(), truncation=True, max_length=stack.prepare.max_tokens)
    token_ids = dict(zip(texts["id"].to_pylist(), seqs["input_ids"]))
    rows = []
    for r in found.to_pylist():
        acts = np.zeros(r["length"], np.float32)
        acts[r["act_at"]] = r["act"]
        window_ids = token_ids[r["id"]][r["start"] : r["start"] + r["length"]]
        rows.append({**r, "tokens": tokenizer.batch_decode([[t] for t in window_ids]), "acts": acts.tolist()})
    spans = pa.Table.from_pylist(rows, schema=SPAN_SCHEMA)
    spans = spans.set_column(1, "rank", pa.array(rank, pa.int32()))
    log.info(
        "spans: %d features, %d samples, from the encode pass in %.1fs", len(wanted), len(ids), time.time() - start
    )
    return spans


def rank_within(groups: np.ndarray) -> np.ndarray:
    """1, 2, ... within each run of equal values of a sorted array."""
    starts = np.r_[0, np.flatnonzero(np.diff(groups)) + 1] if len(groups) else np.zeros(0, np.int64)
    return np.arange(len(groups)) - np.repeat(starts, np.diff(np.r_[starts, len(groups)])) + 1
