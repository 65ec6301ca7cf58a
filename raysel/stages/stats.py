"""The reduce stage: per-feature statistics over the whole feature store.

Each block of the store is reduced to a partial (arrays of d_sae, plus the
block's top-N samples per feature), and the partials are merged as they stream
in, so memory is O(d_sae * N) whatever the corpus size. Per feature j:

    doc_freq     samples with g_j(x) > tau (g: the max-pool)
    mass         sum over samples of s_j(x) (s: the sum-pool)
    max          max over samples of g_j(x)
    mean_active  mean of g_j(x) over the samples counted in doc_freq
    top_ids      the N samples with the largest g_j(x), strongest first
    top_values   their g_j(x)
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysel.config import ActivationConfig
from raysel.core import paths
from raysel.core.features import ACTIVATED_SCHEMA, FeatureStore, activated_block
from raysel.core.storage import Storage
from raysel.stages.base import Done, Stage

log = logging.getLogger(__name__)

STATS_COLUMNS = ["id", "feat_ids", "feat_max", "feat_sum"]  # what block_stats and activated_block read


@dataclass
class FeatureStats:
    doc_freq: np.ndarray
    mass: np.ndarray
    max: np.ndarray
    active_sum: np.ndarray  # sum of g_j over the samples counted in doc_freq
    top_feat: np.ndarray  # (feature, sample id, value) of the running top-N, as three arrays
    top_ids: np.ndarray
    top_values: np.ndarray
    n_samples: int

    @classmethod
    def empty(cls, d_sae: int) -> FeatureStats:
        z = np.zeros(d_sae)
        return cls(
            z.astype(np.int64),
            z.copy(),
            z.copy(),
            z.copy(),
            np.zeros(0, np.int64),
            np.zeros(0, object),
            np.zeros(0, np.float32),
            0,
        )

    def floors(self, top_n: int) -> np.ndarray:
        """Per feature, the smallest value of its top_n here (its entries are sorted by feature, then by
        value, descending), or -inf while it has fewer."""
        counts = np.bincount(self.top_feat, minlength=len(self.doc_freq))
        full = counts >= top_n
        floors = np.full(len(counts), -np.inf)
        floors[full] = self.top_values[np.cumsum(counts)[full] - 1]
        return floors

    def merge(self, other: FeatureStats, top_n: int) -> FeatureStats:
        # other's entries below a feature's top_n-th value here cannot enter its top: most of a block's,
        # once a few blocks are merged (ties are kept, for the id order)
        keep = other.top_values >= self.floors(top_n)[other.top_feat]
        feat, ids, values = top_per_feature(
            np.concatenate([self.top_feat, other.top_feat[keep]]),
            np.concatenate([self.top_ids, other.top_ids[keep]]),
            np.concatenate([self.top_values, other.top_values[keep]]),
            top_n,
        )
        return FeatureStats(
            self.doc_freq + other.doc_freq,
            self.mass + other.mass,
            np.maximum(self.max, other.max),
            self.active_sum + other.active_sum,
            feat,
            ids,
            values,
            self.n_samples + other.n_samples,
        )


def block_stats(table: pa.Table, d_sae: int, tau: float, top_n: int) -> FeatureStats:
    """The partial statistics of one block of the feature store."""
    feats = pc.list_flatten(table["feat_ids"]).to_numpy()
    maxes = pc.list_flatten(table["feat_max"]).to_numpy()
    sums = pc.list_flatten(table["feat_sum"]).to_numpy()
    rows = pc.list_parent_indices(table["feat_ids"]).to_numpy()
    lo, hi = (feats.min(), feats.max()) if feats.size else (0, -1)
    if lo < 0 or hi >= d_sae:
        raise ValueError(f"stats: feature id {hi if hi >= d_sae else lo} is out of range for d_sae {d_sae}")
    doc_freq, mass, active_sum, best = _feature_sums(feats, maxes, sums, tau, d_sae, top_n)
    # every feature's top_n entries, and others only where they tie the top_n-th: the exact sort below
    # (ties broken by id) runs on those alone
    near = maxes >= best[feats, 0]
    ids = np.asarray(table["id"].to_pylist(), dtype=object)[rows[near]]
    top = top_per_feature(feats[near].astype(np.int64), ids, maxes[near].astype(np.float32), top_n)
    return FeatureStats(
        doc_freq=doc_freq,
        mass=mass,
        max=np.maximum(best[:, -1], 0).astype(np.float64),
        active_sum=active_sum,
        top_feat=top[0],
        top_ids=top[1],
        top_values=top[2],
        n_samples=table.num_rows,
    )


@numba.njit(cache=True)
def _feature_sums(feat, values, sums, tau, d, top_n):
    """Per feature, in one pass over a block's entries: the samples above tau (is_active's float64
    comparison), the summed sum-pools, the summed max-pools above tau (float64, in entry order, as
    np.bincount adds them), and its top_n largest max-pools in ascending order (-inf where it has
    fewer; most entries are turned away by one comparison with the feature's smallest kept)."""
    doc_freq, mass, active_sum = np.zeros(d, np.int64), np.zeros(d), np.zeros(d)
    best = np.full((d, top_n), -np.inf, values.dtype)
    for i in range(feat.size):
        f, v = feat[i], values[i]
        mass[f] += sums[i]
        if np.float64(v) > tau:
            doc_freq[f] += 1
            active_sum[f] += v
        if v > best[f, 0]:
            j = 1
            while j < top_n and best[f, j] < v:
                best[f, j - 1] = best[f, j]
                j += 1
            best[f, j - 1] = v
    return doc_freq, mass, active_sum, best


def top_per_feature(feat: np.ndarray, ids: np.ndarray, values: np.ndarray, top_n: int):
    """Keep the top_n (feature, id, value) entries of each feature by value; ties go to the smaller id."""
    if not feat.size:
        return feat, ids, values
    order = np.lexsort((-values, feat))
    tied = np.r_[(feat[order][1:] == feat[order][:-1]) & (values[order][1:] == values[order][:-1]), False]
    # runs of equal (feature, value) are few: order each by id as a string, not the whole array
    for start in np.flatnonzero(tied & ~np.r_[False, tied[:-1]]):
        stop = start + 1 + int(np.argmin(tied[start:]))
        run = order[start:stop]
        order[start:stop] = run[np.argsort(ids[run].astype(str), kind="stable")]
    feat, ids, values = feat[order], ids[order], values[order]
    starts = np.flatnonzero(np.r_[True, feat[1:] != feat[:-1]])
    rank = np.arange(feat.size) - np.repeat(starts, np.diff(np.r_[starts, feat.size]))
    keep = rank < top_n
    return feat[keep], ids[keep], values[keep]


def stats_part(table: pa.Table, d_sae: int, tau: float, top_n: int) -> tuple[FeatureStats, pa.Table]:
    """One block's partial statistics and its activated sets, computed where the block was read."""
    return block_stats(table, d_sae, tau, top_n), activated_block(table, tau)


def compute_stats(parts, d_sae: int, top_n: int, activated) -> FeatureStats:
    """Merge the blocks' stats_part results as they arrive from the cluster; each block's activated
    sets are written to `activated` (a parquet writer) as they come."""
    total = FeatureStats.empty(d_sae)
    for partial, sets in parts:
        total = total.merge(partial, top_n)
        activated.write_table(sets)
    return total


def to_table(stats: FeatureStats) -> pa.Table:
    d_sae = len(stats.doc_freq)
    starts = np.searchsorted(stats.top_feat, np.arange(d_sae + 1))  # top_feat is sorted by feature
    offsets = pa.array(starts.astype(np.int32))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_active = np.where(stats.doc_freq > 0, stats.active_sum / stats.doc_freq, 0.0)
    return pa.table(
        {
            "feature": pa.array(np.arange(d_sae, dtype=np.int32)),
            "doc_freq": pa.array(stats.doc_freq.astype(np.int64)),
            "mass": pa.array(stats.mass),
            "max": pa.array(stats.max.astype(np.float32)),
            "mean_active": pa.array(mean_active.astype(np.float32)),
            "top_ids": pa.ListArray.from_arrays(offsets, pa.array(stats.top_ids.tolist(), pa.string())),
            "top_values": pa.ListArray.from_arrays(offsets, pa.array(stats.top_values, pa.float32())),
        }
    )


def observed_width(store: FeatureStore) -> int:
    """1 + the largest feature id in the store, for SAEs whose d_sae the driver cannot read."""
    widths = store.blocks(
        lambda t: int(pc.max(pc.list_flatten(t["feat_ids"])).as_py() or -1) + 1, ["feat_ids"], name="stats: width"
    )
    return max(widths, default=0)


class Calibrate(Stage):
    """The run's tau: activation.tau, or calibrated on the store (on activation.calibrate_rows of its
    samples) so that samples average activation.target_active activated features. Committed, so a
    re-run does not read the store again; the stats stage reports the mean the whole store reaches.
    A side set is given the run's tau as activation.tau, so activation means the same in both."""

    name = "tau"
    needs = ("encode",)
    brief = ("tau",)

    def __init__(self, storage: Storage, activation: ActivationConfig):
        self.storage, self.activation = storage, activation

    def key(self, done: Done) -> dict:
        return {"encode_fingerprint": done["encode"]["fingerprint"], **self.activation.model_dump(mode="json")}

    def run(self, done: Done) -> dict:
        activation = self.activation
        if activation.target_active:
            return FeatureStore(self.storage).calibrate(activation.target_active, activation.calibrate_rows)
        return {"tau": activation.tau}


class Stats(Stage):
    """The reduce over the store at the run's tau; its key is the store's encode fingerprint, tau and top_n."""

    name = "stats"
    needs = ("encode", "tau")
    brief = ("tau", "n_samples", "d_sae")

    def __init__(self, storage: Storage, top_n: int):
        self.storage, self.top_n = storage, top_n

    def key(self, done: Done) -> dict:
        # outputs 2: stats/activated.parquet too, so a root committed before it was written redoes the stage
        return {"encode_fingerprint": done["encode"]["fingerprint"], "tau": done["tau"]["tau"], "top_n": self.top_n,
                "outputs": 2}  # fmt: skip

    def run(self, done: Done) -> dict:
        start, tau = time.time(), done["tau"]["tau"]
        store = FeatureStore(self.storage)
        d_sae = done["encode"]["d_sae"] or observed_width(store)
        self.storage.fs.create_dir(self.storage.path(paths.STATS), recursive=True)
        with (
            self.storage.fs.open_output_stream(self.storage.path(paths.ACTIVATED)) as sink,
            pq.ParquetWriter(sink, ACTIVATED_SCHEMA) as activated,
        ):
            part = functools.partial(stats_part, d_sae=d_sae, tau=tau, top_n=self.top_n)
            stats = compute_stats(store.blocks(part, STATS_COLUMNS, name="stats"), d_sae, self.top_n, activated)
        pq.write_table(to_table(stats), self.storage.path(paths.FEATURE_STATS), filesystem=self.storage.fs)
        summary = {
            "n_samples": stats.n_samples,
            "d_sae": d_sae,
            "tau": tau,
            "top_n": self.top_n,
            "n_features_active": int((stats.doc_freq > 0).sum()),
            "n_activated": int(stats.doc_freq.sum()),  # (sample, feature) pairs above tau: the pool's size in select
            "mean_features_per_sample": round(float(stats.doc_freq.sum()) / max(stats.n_samples, 1), 2),
        }
        self.storage.write_json(paths.STATS_SUMMARY, summary)
        log.info(
            "stats: %d samples, %d of %d features fire (tau %g), %.1f per sample, in %.1fs",
            stats.n_samples,
            summary["n_features_active"],
            d_sae,
            tau,
            summary["mean_features_per_sample"],
            time.time() - start,
        )
        return summary
