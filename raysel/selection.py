"""The select stage: pick a subset from the feature store, never re-encoding.

Methods: `coverage` (SAE-GreedSelect: greedy maximum coverage of activated
features, optional IDF weights), `simscale` (SAE-SimScale: a Jaccard threshold
filter, theta searched to the budget), `random` (seeded) and `longest` (by
response tokens). Each writes selection/<method>/:

    selected.parquet   rank, id, gain (the weighted gain greedy saw) and
                       new_features (features the pick adds to the running union)
    records.parquet, records.jsonl   the selected records in their original fields
    manifest.json      config, versions, model and SAE identity, fingerprints, counts,
                       the coverage curve, and coverage against random and longest
                       at the same budget; written last
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysel import task
from raysel.activation import activated_sets
from raysel.config import RunConfig
from raysel.coverage import greedy_coverage, idf_weights
from raysel.randgreedi import partitions_for, randgreedi
from raysel.results import write_selection
from raysel.simscale import simscale
from raysel.storage import Storage

log = logging.getLogger(__name__)


def resolve_budget(budget: float, n: int) -> int:
    return min(n, int(budget) if budget >= 1 else max(1, round(budget * n)))


@dataclass
class Pool:
    """What the methods pick from: the activated sets of the store, sorted by id, and where it lives."""
    ids: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    response_tokens: np.ndarray
    storage: Storage
    tau: float
    targets: Storage | None  # the target examples' store, for the task methods


def pick(method: str, cfg: RunConfig, pool: Pool, k: int):
    """Row indices in selection order, the gain or score of each pick, and what the method settled on."""
    n = len(pool.ids)
    if method == "coverage":
        weights = idf_weights(pool.indices, n) if cfg.select.idf else None
        sel = cfg.select
        if sel.distributed == "on" or (sel.distributed == "auto" and n > sel.distributed_rows):
            m = partitions_for(n, sel.distributed_rows, sel.partitions)
            ids, gains, settled = randgreedi(pool.storage, pool.tau, k, m, sel.seed, weights)
            return rows_of(pool, ids), gains, settled
        chosen = greedy_coverage(pool.indptr, pool.indices, k, weights)
        return chosen.order, chosen.gains, {"resets": chosen.resets}
    if method == "simscale":
        kept = simscale(pool.indptr, pool.indices, k)
        return kept.order, np.full(len(kept.order), np.nan), {"theta": kept.theta, "theta_passes": kept.passes}
    if method in ("mona", "igds", "fac"):
        ids, scores, settled = against_examples(method, cfg, pool, k)
        return rows_of(pool, ids), scores, settled
    if method == "random":
        order = np.random.default_rng(cfg.select.seed).permutation(n)[:k]
    else:  # longest: most response tokens first, ties to the earlier id
        order = np.lexsort((np.arange(n), -pool.response_tokens))[:k]
    return order, np.full(k, np.nan), {}


def rows_of(pool: Pool, ids: list[str]) -> np.ndarray:
    return np.searchsorted(pool.ids, np.asarray(ids, dtype=object)) if ids else np.empty(0, np.int64)


def against_examples(method: str, cfg: RunConfig, pool: Pool, k: int):
    """The methods that rank the pool against a side set of examples: ids, scores (for fac: the missing
    features each pick adds), and what they settled on."""
    d_sae = pool.storage.read_json("stats/summary.json")["d_sae"]
    if method == "fac":
        ids, added, settled = task.fac_select(cfg, pool.storage, pool.tau, d_sae, k)
        return ids, np.asarray(added, np.float64), settled
    top, settled = (task.mona(cfg, pool.storage, pool.targets, d_sae, k) if method == "mona" else
                    task.igds(cfg, pool.storage, pool.targets, pool.tau, k))
    return top["id"].to_pylist(), top["score"].to_numpy(), settled


def coverage_curve(order: np.ndarray, indptr, indices, points: int = 20) -> tuple[np.ndarray, list[dict]]:
    """Features each pick adds to the running union, and the covered share at checkpoints."""
    total = np.unique(indices).size or 1
    seen = np.zeros(int(indices.max()) + 1 if indices.size else 1, dtype=bool)
    new = np.zeros(len(order), dtype=np.int64)
    for rank, i in enumerate(order):
        feats = indices[indptr[i]: indptr[i + 1]]
        new[rank] = np.count_nonzero(~seen[feats])
        seen[feats] = True
    covered = np.cumsum(new)
    marks = sorted({max(1, round(len(order) * p / points)) for p in range(1, points + 1)})
    return new, [{"k": m, "coverage": round(float(covered[m - 1]) / total, 4)} for m in marks]


MARKER = "stages/select.json"


def run_select(cfg: RunConfig, storage: Storage, manifest_base: dict, tau: float) -> dict:
    task_methods = [m for m in cfg.select.methods if m in ("mona", "igds")]
    # the config sections the chosen methods read: a change to any of them redoes the selection
    sections = ["select", *(["task", "mona", "igds"] if task_methods else []),
                *(["fac"] if "fac" in cfg.select.methods else [])]
    key = {"encode_fingerprint": manifest_base["fingerprints"]["encode"], "tau": tau} | {
        s: getattr(cfg, s).model_dump(mode="json") for s in sections}
    done = storage.read_json(MARKER)
    if done and {k: done.get(k) for k in key} == key:
        log.info("select: up to date; skipping")
        return done
    storage.remove(MARKER)
    start = time.time()
    pool = read_pool(cfg, storage, tau, task.target_store(cfg, storage) if task_methods else None)
    n, indices = len(pool.ids), pool.indices
    budgets = {m: resolve_budget(cfg.igds.budget if m == "igds" else cfg.select.budget, n) for m in cfg.select.methods}
    log.info("select: %d samples, %d activated features, %.1f per sample (tau %g), budgets %s", n,
             np.unique(indices).size, indices.size / max(n, 1), tau, budgets)
    picks, curves = {}, {}
    for method, k in budgets.items():
        order, gains, settled = pick(method, cfg, pool, k)
        new, curves[method] = coverage_curve(order, pool.indptr, indices)
        picks[method] = (order, gains, new, settled)
    baselines = {str(k): {b: coverage_curve(pick(b, cfg, pool, k)[0], pool.indptr, indices)[1][-1]["coverage"]
                     for b in ("random", "longest")} for k in set(budgets.values())}
    raw = selected_records(storage, {i for m in cfg.select.methods for i in pool.ids[picks[m][0]]})
    results = {}
    for method, k in budgets.items():
        order, gains, new, settled = picks[method]
        results[method] = write_selection(storage, method, pool.ids[order], gains, new, raw, {
            **manifest_base, "method": method, "budget": k, "tau": tau, **settled,
            "counts": {**manifest_base["counts"], "n_selected": int(len(order))},
            "objective_curve": curves[method],
            "coverage_at_budget": baselines[str(k)] | {m: curves[m][-1]["coverage"] for m in budgets if budgets[m] == k},
        })
    summary = {**key, "budgets": budgets,
               "n_features_activated": int(np.unique(indices).size),
               "methods": {m: r["coverage_at_budget"][m] for m, r in results.items()},
               "baselines": baselines, "seconds": round(time.time() - start, 2)}
    log.info("select: coverage %s against random and longest %s in %.1fs", summary["methods"], baselines,
             summary["seconds"])
    storage.write_json(MARKER, summary)  # last: every method's selection is committed
    return summary


def read_pool(cfg: RunConfig, storage: Storage, tau: float, targets: Storage | None) -> Pool:
    ids, indptr, indices = activated_sets(storage, tau)
    prepared = pq.read_table(storage.path("prepared"), columns=["id", "n_response_tokens"], filesystem=storage.fs)
    by_id = {i: n for n, i in enumerate(prepared["id"].to_pylist())}
    response_tokens = prepared["n_response_tokens"].to_numpy()[np.array([by_id[i] for i in ids], dtype=np.int64)]
    return Pool(ids, indptr, indices, response_tokens, storage, tau, targets)


def selected_records(storage: Storage, wanted: set) -> dict[str, str]:
    """The original record (JSON) of each wanted id, read with a filter: never the whole corpus's records."""
    table = pq.ParquetDataset(storage.path("prepared"), filesystem=storage.fs,
                              filters=pc.field("id").isin(sorted(wanted))).read(columns=["id", "record"])
    return dict(zip(table["id"].to_pylist(), table["record"].to_pylist()))
