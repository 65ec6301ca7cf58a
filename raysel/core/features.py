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

import collections
import functools
import json
import logging
import posixpath
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysel.core import paths
from raysel.core.progress import Progress
from raysel.core.storage import Storage

log = logging.getLogger(__name__)

DENSE = "dense"  # the column of encode.keep_dense's vectors, written under features/_dense
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
    """The activation rule, for an array of max-pooled values (numpy or arrow). Compared in float64 in
    both: numpy would round a Python float tau to float32 first, arrow does not, and a value equal to
    float32(tau) would then count in the statistics but not in the activated sets."""
    if isinstance(max_pool, np.ndarray):
        return max_pool > np.float64(tau)
    return pc.greater(max_pool, tau)


def activated_entries(table: pa.Table, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, feature, max-pool) of every activated entry of a feature-store table."""
    keep = is_active(pc.list_flatten(table["feat_max"]), tau)
    rows = pc.list_parent_indices(table["feat_ids"]).filter(keep).to_numpy()
    feats = pc.list_flatten(table["feat_ids"]).filter(keep).to_numpy().astype(np.int64)
    values = pc.list_flatten(table["feat_max"]).filter(keep).to_numpy().astype(np.float64)
    return rows, feats, values


def document_frequency(indices: np.ndarray) -> np.ndarray:
    """How many entries hold each feature, 0 to the largest. Not np.bincount: it first copies the
    int32 entries to int64, 5 GB beside the 2.6 GB pool at 10M samples of 64 features."""
    from raysel.core.features_kernel import counts  # numba, loaded when first counted

    return counts(indices, int(indices.max()) + 1 if indices.size else 1)


ACTIVATED_SCHEMA = pa.schema([("id", pa.string()), ("feats", pa.list_(pa.int32()))])


def activated_block(table: pa.Table, tau: float) -> pa.Table:
    """A block of the store cut to its activated features: (id, feats: list<int32>)."""
    rows, feats, _ = activated_entries(table, tau)
    offsets = np.r_[0, np.cumsum(np.bincount(rows, minlength=table.num_rows))].astype(np.int32)
    sets = pa.ListArray.from_arrays(offsets, feats.astype(np.int32))
    return pa.table([table["id"].cast(pa.string()), sets], schema=ACTIVATED_SCHEMA)


def csr_by_id(read: Callable[[], Iterable[pa.Table]], columns: tuple[str, ...] = ("feats",)) -> tuple:
    """(ids, indptr, *entries) sorted by id, from blocks of an id and the list columns `columns`, whose
    lists have the same lengths row by row (int32 sets, and their values when asked for).

    read() gives the blocks and is called twice: for the ids and list sizes, which place every row, then
    to copy each block's entries straight to their place. The entries are held once, at the peak, where
    holding them as read and then reordering took twice that (2.6 GB more at 10M samples of 64)."""
    ids, counts, dtypes = [], [], None
    for block in read():
        ids.append(block["id"])
        counts.append(pc.list_value_length(block[columns[0]]).to_numpy(zero_copy_only=False))
        dtypes = [block.schema.field(c).type.value_type.to_pandas_dtype() for c in columns]
    if not ids:  # no block to read the types from: int32 sets, float64 values (as pooled_lists writes)
        return np.zeros(0, object), np.zeros(1, np.int64), np.zeros(0, np.int32), *(np.zeros(0) for _ in columns[1:])
    ids, counts = pa.chunked_array(ids), np.nan_to_num(np.concatenate(counts)).astype(np.int64)  # null: empty
    order = pc.sort_indices(ids).to_numpy()
    indptr = np.r_[0, np.cumsum(counts[order])].astype(np.int64)
    place = np.empty(len(order), np.int64)
    place[order] = indptr[:-1]
    entries, row = [np.empty(indptr[-1], dtype) for dtype in dtypes], 0
    for block in read():
        sizes = counts[row : row + block.num_rows]
        flats = [pc.list_flatten(block[c]).to_numpy() for c in columns]
        if sizes.size < block.num_rows or any(sizes.sum() != flat.size for flat in flats):
            raise RuntimeError("the rows changed between their two reads")
        at = np.repeat(place[row : row + block.num_rows] - (np.cumsum(sizes) - sizes), sizes) + np.arange(sizes.sum())
        for into, flat in zip(entries, flats):
            into[at] = flat
        row += block.num_rows
    if row != len(counts):
        raise RuntimeError("the rows changed between their two reads")
    return ids.take(order).to_numpy(zero_copy_only=False), indptr, *entries


def pooled_lists(table: pa.Table, pooling: str) -> pa.Table:
    """A feature-store block as (id, feats, values: list<float64>), values its pooled vectors (pooled)."""
    lengths = pc.fill_null(pc.list_value_length(table["feat_ids"]), 0).to_numpy()
    offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
    values = pa.ListArray.from_arrays(offsets, pa.array(pooled(table, pooling)[2]))
    return pa.table({"id": table["id"], "feats": table["feat_ids"], "values": values})


def list_entries(meta: pq.FileMetaData, column: str) -> int:
    """The entries of a list column (of non-null elements), from a parquet footer. Parquet counts a
    level for each empty or null list among its values, and as a null in the statistics: those go.
    A writer that kept no statistics leaves an upper bound."""
    return sum(
        chunk.num_values
        - (chunk.statistics.null_count if chunk.is_stats_set and chunk.statistics.has_null_count else 0)
        for chunk in column_chunks(meta, f"{column}.list.element")
    )


def column_chunks(meta: pq.FileMetaData, path: str) -> Iterator[pq.ColumnChunkMetaData]:
    """The footer's entry of the column `path` (as parquet names it) in every row group."""
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        yield from (group.column(c) for c in range(group.num_columns) if group.column(c).path_in_schema == path)


@dataclass
class Profile:
    """Per feature over a set of samples: how many activate it, its largest max-pool, and the sum of
    its max-pools over the samples that activate it."""

    counts: np.ndarray
    peak: np.ndarray
    rows: int
    mass: np.ndarray

    @classmethod
    def empty(cls, d_sae: int) -> Profile:
        return cls(np.zeros(d_sae, np.int64), np.zeros(d_sae), 0, np.zeros(d_sae))

    @property
    def share(self) -> np.ndarray:
        return self.counts / max(self.rows, 1)

    @property
    def mean(self) -> np.ndarray:
        """Per feature, its mean max-pool over the samples that activate it (0 where none does)."""
        return self.mass / np.maximum(self.counts, 1)

    @classmethod
    def of(cls, table: pa.Table, tau: float, d_sae: int) -> Profile:
        values = pc.list_flatten(table["feat_max"]).to_numpy().astype(np.float64)
        feats = pc.list_flatten(table["feat_ids"]).to_numpy().astype(np.int64)
        peak = np.zeros(d_sae)
        np.maximum.at(peak, feats, values)
        active = is_active(values, tau)
        on, values = feats[active], values[active]
        return cls(np.bincount(on, minlength=d_sae), peak, table.num_rows, np.bincount(on, values, minlength=d_sae))

    def merge(self, other: Profile) -> Profile:
        return Profile(self.counts + other.counts, np.maximum(self.peak, other.peak), self.rows + other.rows,
                       self.mass + other.mass)  # fmt: skip


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


# Exact order statistics of float32 values in two histogram passes, never holding the values: a
# float32's bits, mapped so that integer order is float order, split into a high part (pass one
# finds the bin that holds the wanted rank) and a low part (pass two finds the value inside it).
LOW_BITS = 16  # 65,536 bins a pass: small partials to send, and counts that stay in cache


def ordered_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 with the same order (negatives flipped whole, positives above them)."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))


def from_ordered_bits(key: int) -> float:
    bits = np.uint32(key)
    bits = bits & np.uint32(0x7FFFFFFF) if bits >> 31 else ~bits
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def max_pools(table: pa.Table) -> np.ndarray:
    return pc.list_flatten(table["feat_max"]).to_numpy()


def low_histogram(values: np.ndarray, high: int, ordered: bool = False) -> np.ndarray:
    keys = values if ordered else ordered_bits(values)
    return np.bincount(keys[(keys >> LOW_BITS) == high] & ((1 << LOW_BITS) - 1), minlength=1 << LOW_BITS)


def tau_block(table: pa.Table, share: float) -> pa.Table:
    """A block's high histogram, and the low histograms of the bins around its own value at `share` from
    the top: a block of thousands of rows rarely misses the whole store's bin by more than one."""
    keys = ordered_bits(max_pools(table))
    high = np.bincount(keys >> LOW_BITS, minlength=1 << (32 - LOW_BITS))
    own, _ = rank_from_top(high, int(share * keys.size))
    bins = np.unique(np.clip(own + np.arange(-1, 2), 0, high.size - 1)) if keys.size else np.zeros(0, np.int64)
    lows = np.concatenate([np.zeros(0, np.int64), *(low_histogram(keys, b, ordered=True) for b in bins)])
    as_list = functools.partial(pa.array, type=pa.list_(pa.int64()))
    return pa.table(
        {"high": as_list([high]), "empty": [not keys.size], "bins": as_list([bins]), "lows": as_list([lows])}
    )


def tau_merge(parts, rank: int) -> tuple[int, int, np.ndarray | None]:
    """(the high bin holding the rank-th largest value, the values in higher bins, the bin's low histogram
    when every non-empty block sent it, else None: a second pass must count it)."""
    total, lows, betting, n_blocks = None, {}, collections.Counter(), 0
    for part in parts:
        for high, empty, bins, low in zip(*(part[c].to_numpy(zero_copy_only=False) for c in part.column_names)):
            total = high if total is None else total + high
            n_blocks += not empty
            for i, b in enumerate(bins):
                lows[b] = lows.get(b, 0) + low[i << LOW_BITS : (i + 1) << LOW_BITS]
                betting[b] += 1
    high, above = rank_from_top(total, rank)
    return high, above, lows[high] if betting[high] == n_blocks else None


def rank_from_top(histogram: np.ndarray, rank: int) -> tuple[int, int]:
    """(bin holding the rank-th largest value (0-based), how many values lie in higher bins)."""
    above = np.cumsum(histogram[::-1])
    b = int(np.searchsorted(above, rank, side="right"))  # reversed index of the bin
    return histogram.size - 1 - b, int(above[b - 1]) if b else 0


def seeded_hash(ids, seed: int) -> np.ndarray:
    """A 64-bit hash of each id under `seed` (siphash, keyed by it). Where a ranking is cut, ties go by
    it, never by the id itself: ids often encode their source, and id order would fill a tie with
    one source first."""
    import pandas as pd

    key = f"raysel{seed:010d}"[-16:]  # siphash's 16-byte key
    return pd.util.hash_array(np.asarray(ids, dtype=object), hash_key=key)


SAE_FEATURES = pa.list_(pa.struct([("feature", pa.int32()), ("activation", pa.float32())]))


def strongest_block(table: pa.Table, wanted: pa.Array, n: int) -> pa.Table:
    """The rows of `wanted` ids with their `n` strongest features by peak activation (ties: lower id)."""
    table = table.filter(pc.is_in(table["id"], value_set=wanted))
    tops = []
    for feats, peaks in zip(table["feat_ids"].to_pylist(), table["feat_max"].to_pylist()):
        order = np.argsort(-np.asarray(peaks, np.float64), kind="stable")[:n]
        tops.append([{"feature": feats[i], "activation": peaks[i]} for i in order])
    return pa.table({"id": table["id"], "sae_features": pa.array(tops, SAE_FEATURES)})


def top_k(ids: np.ndarray, scores: np.ndarray, k: int, seed: int) -> pa.Table:
    """The k best (id, score), highest score first, ties by the ids' seeded hash."""
    order = np.lexsort((seeded_hash(ids, seed), -scores))[:k]
    return pa.table({"id": pa.array(ids[order], pa.string()), "score": pa.array(scores[order], pa.float64())})


def top_of(table: pa.Table, k: int, seed: int, score_block=None) -> pa.Table:
    """top_k of a table of ids, by score_block(table) or by its score column."""
    scores = score_block(table) if score_block else table["score"].to_numpy()
    return top_k(np.asarray(table["id"].to_pylist(), dtype=object), scores, k, seed)


def pooled_columns(pooling: str) -> list[str]:
    """The store columns pooled(table, pooling) reads."""
    return ["feat_ids", "feat_max"] if pooling == "max" else ["feat_ids", "feat_sum", "n_tokens"]


class FeatureStore:
    """The committed feature store of one encoded set (the run's input, or a side set) under its root."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def done_shards(self) -> dict[str, dict]:
        """The shard markers, by shard name."""
        # a local marker caught mid-write, before its rename, has another suffix
        infos = [i for i in self.storage.listing(paths.FEATURES_DONE) if i.path.endswith(".json")]
        return {posixpath.basename(i.path).removesuffix(".json"): json.loads(data)
                for i, data in zip(infos, self.storage.read_files(infos))}  # fmt: skip

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
        shards = self.shard_counts()
        return sum(r for _, r, _ in shards), sum(s for _, _, s in shards)

    def shard_counts(self) -> list[tuple[str, int, int]]:
        """(path, rows, stored features) of each committed shard, from its parquet footer."""
        found = []
        for path in self.shard_paths():
            meta = pq.ParquetFile(path, filesystem=self.storage.fs).metadata
            found.append((path, meta.num_rows, list_entries(meta, "feat_ids")))
        return found

    def top_k(self, score_block, k: int, columns: list[str], seed: int) -> pa.Table:
        """The k best (id, score) of the store by score_block(table of id and `columns`) -> scores, ties
        by the ids' seeded hash, in one pass on the cluster: each shard sends back its own top k,
        merged here as they arrive."""
        tops, held = [], 0
        best = functools.partial(top_of, k=k, seed=seed, score_block=score_block)
        for top in self.blocks(best, ["id", *columns], name="top k"):
            tops.append(top)
            held += top.num_rows
            if held > 4 * k:  # the driver holds a few k rows whatever the store's size
                tops = [top_of(pa.concat_tables(tops), k, seed)]
                held = tops[0].num_rows
        return top_of(pa.concat_tables(tops), k, seed) if tops else top_k(np.array([], object), np.array([]), k, seed)

    def strongest(self, ids: list[str], n: int) -> pa.Table:
        """id and the `n` strongest features (SAE_FEATURES, by peak activation) of each sample of `ids`,
        in one pass on the cluster: each shard sends back its own samples of `ids`."""
        fn = functools.partial(strongest_block, wanted=pa.array(ids, pa.string()), n=n)
        tops = list(self.blocks(fn, ["id", "feat_ids", "feat_max"], name="top features"))
        return (
            pa.concat_tables(tops)
            if tops
            else pa.table({"id": pa.array([], pa.string()), "sae_features": pa.array([], SAE_FEATURES)})
        )

    def activated_sets(self, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids, and A(x) of every sample in CSR form (indptr, int32 indices), sorted by id. Each block
        is cut to its activated entries on the cluster; the driver holds the cut blocks while it builds
        the CSR from them (committed_activated_sets, what the select stage reads, holds the CSR alone)."""
        sets = list(
            self.blocks(functools.partial(activated_block, tau=tau), ["id", "feat_ids", "feat_max"], name="sets")
        )
        return csr_by_id(lambda: sets)

    def committed_activated_sets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """activated_sets at the statistics' tau, read from what the stats stage wrote (a few percent
        of the store's bytes) instead of a pass over the store."""

        def read():
            with self.storage.fs.open_input_file(self.storage.path(paths.ACTIVATED)) as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=1 << 16)

        return csr_by_id(read)

    def pooled_vectors(self, pooling: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """ids, and every sample's pooled vector (pooled) in CSR form (indptr, int32 features, float64
        values), sorted by id. The shards are read here twice, a batch at a time: the driver holds the
        CSR alone, 12 B a stored entry."""

        def read():
            for path in self.shard_paths():
                with self.storage.fs.open_input_file(path) as f:
                    for batch in pq.ParquetFile(f).iter_batches(2048, columns=["id", *pooled_columns(pooling)]):
                        yield pooled_lists(pa.Table.from_batches([batch]), pooling)

        return csr_by_id(read, ("feats", "values"))

    def mean_id_length(self) -> float:
        """The ids' mean length in characters, over the activated sets' first row group: what the
        select stage's memory check charges a sample's id by."""
        with self.storage.fs.open_input_file(self.storage.path(paths.ACTIVATED)) as f:
            sets = pq.ParquetFile(f)
            ids = sets.read_row_group(0, columns=["id"])["id"] if sets.num_row_groups else pa.array([], pa.string())
        return float(pc.mean(pc.utf8_length(ids)).as_py() or 0.0)

    def blocks(self, fn, columns: list[str], shards: list[str] | None = None, *, name: str):
        """fn(table) -> table over every shard (all committed ones by default), each in a Ray task on
        the cluster, the results streamed back here in shard order; the pass's progress is logged as
        `name` (shards, samples/s, ETA)."""
        from raysel.core.ray_adapter import map_files

        rows = {path: n for path, n, _ in self.shard_counts()}
        shards = list(rows) if shards is None else shards
        progress = Progress(name, len(shards), sum(rows[s] for s in shards))
        for shard, result in zip(shards, map_files(shards, fn, columns, self.storage.fs)):
            progress.update(rows[shard])
            yield result
        progress.close()

    def resolve_tau(self, tau: float, target_active: float | None) -> float:
        """`tau`, or the one calibrate() finds for `target_active` over every shard."""
        return self.calibrate(target_active)["tau"] if target_active else tau

    def calibrate(self, target_active: float, sample_rows: int | None = None) -> dict:
        """The tau at which samples average `target_active` activated features: the exact value
        calibrate_tau finds over the calibration sample (every shard, or with `sample_rows` every
        step-th, about that many samples), from histogram passes on the cluster: one, or two when some
        block's values lie far from the sample's. Whole shards, evenly spaced: a store written in input
        order is sampled across all of it, and a shard is read whole or not at all."""
        shards = self.shard_counts()
        rows = sum(r for _, r, _ in shards)
        step = max(1, -(-rows // sample_rows)) if sample_rows else 1
        sample = shards[step // 2 :: step] or shards
        paths_, taken, stored = [p for p, _, _ in sample], sum(r for _, r, _ in sample), sum(s for *_, s in sample)
        rank = int(round(taken * target_active))  # tau is the (rank + 1)-th largest max-pool
        tau = 0.0 if rank >= stored else self.tau_at_rank(rank, stored, paths_)
        log.info("activation: tau %g gives %g activated features per sample on average (calibrated on %d of %d "
                 "samples)", tau, target_active, taken, rows)  # fmt: skip
        return {"tau": tau, "calibrated_on": taken, "of": rows}

    def tau_at_rank(self, rank: int, stored: int, shards: list[str]) -> float:
        """The (rank + 1)-th largest max-pool of the shards' `stored` values."""
        high, above, low_counts = tau_merge(
            self.blocks(functools.partial(tau_block, share=rank / stored), ["feat_max"], shards, name="tau"), rank
        )
        if low_counts is None:  # some block did not bet on the bin tau fell in: a second pass
            low_counts = self.summed(lambda t: low_histogram(max_pools(t), high), ["feat_max"], shards)
        low, _ = rank_from_top(low_counts, rank - above)
        return from_ordered_bits((high << LOW_BITS) | low)

    def profile(self, tau: float, d_sae: int) -> Profile:
        """The store's Profile, one per block on the cluster, merged here."""

        def block(table: pa.Table) -> pa.Table:
            p = Profile.of(table, tau, d_sae)
            return pa.table({"counts": [p.counts], "peak": [p.peak], "rows": [p.rows], "mass": [p.mass]})

        total = Profile.empty(d_sae)
        for part in self.blocks(block, ["feat_ids", "feat_max"], name="profile"):
            for counts, peak, rows, mass in zip(
                *(part[c].to_numpy(zero_copy_only=False) for c in ("counts", "peak", "rows", "mass"))
            ):
                total = total.merge(Profile(counts, peak, int(rows), mass))
        return total

    def summed(self, fn, columns: list[str], shards: list[str] | None = None) -> np.ndarray | None:
        """The sum over the store's blocks (or the shards') of fn(table) -> a 1-D int64 array, each
        computed on the cluster."""

        def block(table: pa.Table) -> pa.Table:
            return pa.table({"counts": pa.array([fn(table).astype(np.int64)], pa.list_(pa.int64()))})

        total = None
        for part in self.blocks(block, columns, shards, name="tau, second pass"):
            for counts in part["counts"].to_numpy(zero_copy_only=False):
                total = counts if total is None else total + counts
        return total

    def summary(self) -> dict:
        """The statistics' summary: n_samples, d_sae, tau, ..."""
        return self.storage.read_json(paths.STATS_SUMMARY)


def frequency_recall(targets: pa.Table, tau: float, pool_doc_freq: np.ndarray, n_pool: int, n: int) -> pa.Table:
    """The n features most enriched on the targets over the pool, by share of samples activating them;
    only those with a positive lift (more common on the targets than on the pool)."""
    _, feats, _ = activated_entries(targets, tau)
    target_share = np.bincount(feats, minlength=pool_doc_freq.size) / max(targets.num_rows, 1)
    pool_share = pool_doc_freq / max(n_pool, 1)
    lift = target_share - pool_share
    order = np.lexsort((np.arange(lift.size), -lift))
    order = order[lift[order] > 0][:n]
    return pa.table(
        {
            "feature": order.astype(np.int64),
            "target_share": target_share[order],
            "pool_share": pool_share[order],
            "lift": lift[order],
        }
    )
