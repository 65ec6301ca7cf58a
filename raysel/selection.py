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

import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysel.activation import activated_sets
from raysel.config import RunConfig
from raysel.coverage import idf_weights, greedy_coverage
from raysel.simscale import simscale
from raysel.storage import Storage

log = logging.getLogger(__name__)


def resolve_budget(budget: float, n: int) -> int:
    return min(n, int(budget) if budget >= 1 else max(1, round(budget * n)))


def pick(method: str, cfg: RunConfig, indptr, indices, response_tokens: np.ndarray, k: int):
    """Row indices in selection order, the gain each pick was chosen for, and what the method settled on."""
    if method == "coverage":
        weights = idf_weights(indices, len(indptr) - 1) if cfg.select.idf else None
        chosen = greedy_coverage(indptr, indices, k, weights)
        return chosen.order, chosen.gains, {"resets": chosen.resets}
    if method == "simscale":
        kept = simscale(indptr, indices, k)
        return kept.order, np.full(len(kept.order), np.nan), {"theta": kept.theta, "theta_passes": kept.passes}
    if method == "random":
        order = np.random.default_rng(cfg.select.seed).permutation(len(indptr) - 1)[:k]
    else:  # longest: most response tokens first, ties to the earlier id
        order = np.lexsort((np.arange(len(response_tokens)), -response_tokens))[:k]
    return order, np.full(k, np.nan), {}


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
    key = {"encode_fingerprint": manifest_base["fingerprints"]["encode"], "tau": tau,
           "select": cfg.select.model_dump(mode="json")}
    done = storage.read_json(MARKER)
    if done and {k: done.get(k) for k in key} == key:
        log.info("select: up to date; skipping")
        return done
    storage.remove(MARKER)
    start = time.time()
    ids, indptr, indices = activated_sets(storage, tau)
    prepared = pq.read_table(storage.path("prepared"), columns=["id", "n_response_tokens"], filesystem=storage.fs)
    by_id = {i: n for n, i in enumerate(prepared["id"].to_pylist())}
    where = np.array([by_id[i] for i in ids])
    response_tokens = prepared["n_response_tokens"].to_numpy()[where]
    k = resolve_budget(cfg.select.budget, len(ids))
    log.info("select: %d samples, %d activated features, %.1f per sample (tau %g), budget %d", len(ids),
             np.unique(indices).size, indices.size / max(len(ids), 1), tau, k)
    picks, curves = {}, {}
    for method in dict.fromkeys([*cfg.select.methods, "random", "longest"]):  # baselines always, for comparison
        order, gains, settled = pick(method, cfg, indptr, indices, response_tokens, k)
        new, curve = coverage_curve(order, indptr, indices)
        picks[method], curves[method] = (order, gains, new, settled), curve
    raw = selected_records(storage, {i for m in cfg.select.methods for i in ids[picks[m][0]]})
    results = {}
    for method in cfg.select.methods:
        order, gains, new, settled = picks[method]
        results[method] = write_selection(storage, method, ids[order], gains, new, raw, {
            **manifest_base, "method": method, "budget": k, "tau": tau, **settled,
            "counts": {**manifest_base["counts"], "n_selected": int(len(order))},
            "objective_curve": curves[method],
            "coverage_at_budget": {m: curves[m][-1]["coverage"] for m in curves},
        })
    summary = {**key, "budget": k, "n_features_activated": int(np.unique(indices).size),
               "methods": {m: r["coverage_at_budget"][m] for m, r in results.items()},
               "seconds": round(time.time() - start, 2)}
    log.info("select: coverage at budget %d: %s (random %.3f, longest %.3f) in %.1fs", k, summary["methods"],
             curves["random"][-1]["coverage"], curves["longest"][-1]["coverage"], summary["seconds"])
    storage.write_json(MARKER, summary)  # last: every method's selection is committed
    return summary


def selected_records(storage: Storage, wanted: set) -> dict[str, str]:
    """The original record (JSON) of each wanted id, read with a filter: never the whole corpus's records."""
    table = pq.ParquetDataset(storage.path("prepared"), filesystem=storage.fs,
                              filters=pc.field("id").isin(sorted(wanted))).read(columns=["id", "record"])
    return dict(zip(table["id"].to_pylist(), table["record"].to_pylist()))


def write_selection(storage: Storage, method: str, ids, gains, new, records_by_id: dict, manifest: dict) -> dict:
    base = f"selection/{method}"
    storage.remove(f"{base}/manifest.json")  # a half-rewritten selection must not look finished
    storage.fs.create_dir(storage.path(base), recursive=True)
    selected = pa.table({"rank": pa.array(np.arange(1, len(ids) + 1, dtype=np.int32)),
                         "id": pa.array(list(ids), pa.string()),
                         "gain": pa.array(gains, pa.float64(), from_pandas=True),  # NaN (no gain) -> null
                         "new_features": pa.array(new, pa.int64())})
    pq.write_table(selected, storage.path(base, "selected.parquet"), filesystem=storage.fs)
    raw = [records_by_id[i] for i in ids]
    with storage.fs.open_output_stream(storage.path(base, "records.jsonl")) as f:
        f.write("".join(r + "\n" for r in raw).encode())
    records = [json.loads(r) for r in raw]
    keys = list(dict.fromkeys(k for r in records for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]),
                   storage.path(base, "records.parquet"), filesystem=storage.fs)
    storage.write_json(f"{base}/manifest.json", manifest)  # last: the selection is committed
    return manifest
