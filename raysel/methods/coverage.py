"""SAE-GreedSelect: greedy maximum coverage of the activated features (coverage_kernel.py), on one
node, or past `distributed_rows` samples as RandGreeDi (Barbosa et al., 2015) over the cluster.

RandGreeDi splits the samples into m random partitions (a seeded hash of the id). Each partition
runs the coverage greedy for the whole budget k on its own, as one Ray Data group read straight
from the feature store, so no worker holds more than its partition. The m * k candidates come back
to the driver, the greedy runs again on them, and the answer is the better of that and the best
partition's own pick, by covered weight. In expectation that is within (1 - 1/e) / 2 of the
optimum; on real pools it is within a few percent of the single-node greedy (benchmarks/scale.py
measures the ratio).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Literal

import numba
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray
from pydantic import Field

from raysel.core.features import FeatureStore, activated_entries
from raysel.core.ray_adapter import task_cpus
from raysel.methods.base import Context, Method, MethodConfig, Picks, Pool
from raysel.methods.coverage_kernel import greedy_coverage, idf_weights, working_bytes

log = logging.getLogger(__name__)


class CoverageConfig(MethodConfig):
    name: Literal["coverage"] = "coverage"
    idf: bool = False  # weigh each feature's gain by its inverse document frequency
    distributed: Literal["auto", "on", "off"] = "auto"  # RandGreeDi over the cluster; auto: past distributed_rows
    distributed_rows: int = Field(2_000_000, gt=0)  # auto distributes larger pools; RandGreeDi's rows per partition
    partitions: int | None = Field(None, ge=2)  # RandGreeDi partitions; None: one per distributed_rows, at least 2


class Coverage(Method):
    Config = CoverageConfig
    memory_remedy = (
        "Set distributed: on in coverage's entry of select.methods (only RandGreeDi's candidates come back). "
    )

    def distributes(self, n: int) -> bool:
        return self.cfg.distributed == "on" or (self.cfg.distributed == "auto" and n > self.cfg.distributed_rows)

    def partitions(self, n: int) -> int:
        return partitions_for(n, self.cfg.distributed_rows, self.cfg.partitions)

    def driver_bytes(self, store: FeatureStore, k: int, ctx: Context) -> int:
        """The greedy's working memory over the pool; under RandGreeDi, over the m * k candidates that
        come back to the driver, beside the table they come in."""
        stats = store.summary()
        rows, per_row = stats["n_samples"], stats["mean_features_per_sample"]
        if not self.distributes(rows):
            return working_bytes(rows, round(rows * per_row))
        candidates = min(rows, k * self.partitions(rows))
        entries = round(candidates * per_row)
        return (
            working_bytes(candidates, entries)
            + CANDIDATE_BYTES_PER_ENTRY * entries
            + CANDIDATE_BYTES_PER_ROW * candidates
        )

    def pick(self, pool: Pool, k: int, ctx: Context) -> Picks:
        n = len(pool.ids)
        weights = idf_weights(pool.indices, n) if self.cfg.idf else None
        if self.distributes(n):
            ids, gains, settled = randgreedi(pool.store, ctx.tau, k, self.partitions(n), ctx.seed, weights)
            return Picks(ids, gains, settled)
        chosen = greedy_coverage(pool.indptr, pool.indices, k, weights)
        return Picks(pool.ids[chosen.order].tolist(), chosen.gains, {"resets": chosen.resets})


# RandGreeDi's candidates on the driver, as Arrow: their int32 entries, and an id, partition and
# objective a row
CANDIDATE_BYTES_PER_ENTRY = 4
CANDIDATE_BYTES_PER_ROW = 100


def partitions_for(n: int, rows_per_partition: int, partitions: int | None) -> int:
    return partitions or max(2, math.ceil(n / rows_per_partition))


def covered_weight(indptr: np.ndarray, indices: np.ndarray, order: np.ndarray, weights: np.ndarray | None) -> float:
    """The objective: the total weight of the features the picked rows cover."""
    picked = np.zeros(len(indptr) - 1, dtype=bool)
    picked[order] = True
    feats = np.unique(indices[np.repeat(picked, np.diff(indptr))])
    return float(feats.size if weights is None else weights[feats].sum())


def assign(batch: pa.Table, tau: float, partitions: int, seed: int) -> pa.Table:
    """Each sample's activated set A(x), and its partition."""
    batch = batch.combine_chunks()
    rows, feats, _ = activated_entries(batch, tau)
    offsets = pa.array(np.r_[0, np.cumsum(np.bincount(rows, minlength=batch.num_rows))].astype(np.int32))
    key = f"raysel{seed:010d}"[-16:]  # the 16-byte siphash key: the seed picks the partitioning
    part = pd.util.hash_array(np.asarray(batch["id"].to_pylist(), dtype=object), hash_key=key) % np.uint64(partitions)
    return pa.table(
        {
            "id": batch["id"],
            "feats": pa.ListArray.from_arrays(offsets, pa.array(feats, pa.int32())),
            "part": pa.array(part.astype(np.int32)),
        }
    )


def csr(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(int64 indptr, int32 indices: the list<int32> entries as they are), as the greedy takes them."""
    offsets = table["feats"].combine_chunks().offsets.to_numpy()
    return (offsets - offsets[0]).astype(np.int64), pc.list_flatten(table["feats"]).to_numpy()


def local_greedy(group: pa.Table, budget: int, weights: np.ndarray | None) -> pa.Table:
    """One partition's greedy: its k picks in order, with its objective on every row."""
    group = group.sort_by("id")  # ties break by id, whatever order the shuffle delivered
    indptr, indices = csr(group)
    # as many threads as the task has CPUs: the kernel's per-pick hand-off between its threads
    # crawls when the partitions running side by side ask for more threads than there are cores
    numba.set_num_threads(min(numba.config.NUMBA_NUM_THREADS, task_cpus()))
    chosen = greedy_coverage(indptr, indices, budget, weights)
    picked = group.take(pa.array(chosen.order))
    objective = covered_weight(indptr, indices, chosen.order, weights)
    return picked.append_column("objective", pa.array(np.full(picked.num_rows, objective)))


def randgreedi(
    store: FeatureStore, tau: float, budget: int, partitions: int, seed: int, weights: np.ndarray | None
) -> tuple[list[str], np.ndarray, dict]:
    """Ids in selection order, each pick's gain, and what the run settled on."""
    start = time.time()
    ds = store.dataset().map_batches(
        assign, fn_kwargs={"tau": tau, "partitions": partitions, "seed": seed}, batch_format="pyarrow"
    )
    candidates = ds.groupby("part", num_partitions=partitions).map_groups(
        local_greedy, fn_kwargs={"budget": budget, "weights": weights}, batch_format="pyarrow"
    )
    pool = pa.concat_tables(ray.get(candidates.to_arrow_refs())).sort_by("id")
    log.info(
        "select: RandGreeDi: %d candidates from %d partitions in %.1fs", pool.num_rows, partitions, time.time() - start
    )
    indptr, indices = csr(pool)
    merged = greedy_coverage(indptr, indices, budget, weights)
    objective = covered_weight(indptr, indices, merged.order, weights)
    parts = (
        pool.group_by("part")
        .aggregate([("objective", "max")])
        .sort_by([("objective_max", "descending"), ("part", "ascending")])
    )
    settled = {
        "distributed": True,
        "partitions": partitions,
        "n_candidates": pool.num_rows,
        "objective_merged": objective,
        "objective_best_partition": parts["objective_max"][0].as_py(),
    }
    if settled["objective_best_partition"] > objective:  # the guarantee needs the better of the two
        best = parts["part"][0].as_py()
        rows = np.flatnonzero(pool["part"].to_numpy() == best)
        sub = pool.take(pa.array(rows))
        chosen = greedy_coverage(*csr(sub), budget, weights)  # the partition's own order, replayed
        ids = sub["id"].take(pa.array(chosen.order)).to_pylist()
        return ids, chosen.gains, settled | {"resets": chosen.resets, "answer": f"partition {best}"}
    ids = pool["id"].take(pa.array(merged.order)).to_pylist()
    return ids, merged.gains, settled | {"resets": merged.resets, "answer": "merged"}
