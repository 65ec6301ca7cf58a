"""RandGreeDi, coverage's distributed path: the store's samples hashed into partitions on the cluster,
a greedy per partition (Ray Data's groupby), and the greedy again over the m * k candidates on the
driver; the better of that and the best partition's own answer is kept."""

from __future__ import annotations

import logging
import time

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from raysel.core.features import FeatureStore, activated_entries, seeded_hash
from raysel.core.ray_adapter import task_cpus
from raysel.methods.coverage_kernel import greedy_coverage

log = logging.getLogger(__name__)


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
    tie = seeded_hash(batch["id"].to_pylist(), seed)
    return pa.table(
        {
            "id": batch["id"],
            "feats": pa.ListArray.from_arrays(offsets, pa.array(feats, pa.int32())),
            "part": pa.array((tie % np.uint64(partitions)).astype(np.int32)),  # the seed picks the partitioning
            "tie": pa.array(tie),  # and the greedy's order: ties as on one node (seeded_coverage)
        }
    )


TIE_ORDER = [("tie", "ascending"), ("id", "ascending")]


def csr(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(int64 indptr, int32 indices: the list<int32> entries as they are), as the greedy takes them."""
    offsets = table["feats"].combine_chunks().offsets.to_numpy()
    return (offsets - offsets[0]).astype(np.int64), pc.list_flatten(table["feats"]).to_numpy()


def local_greedy(group: pa.Table, budget: int, weights: np.ndarray | None) -> pa.Table:
    """One partition's greedy: its k picks in order, with its objective on every row."""
    group = group.sort_by(TIE_ORDER)  # ties break by the seeded hash, whatever order the shuffle delivered
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
    pool = pa.concat_tables(ray.get(candidates.to_arrow_refs())).sort_by(TIE_ORDER)
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
