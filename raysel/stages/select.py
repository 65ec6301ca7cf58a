"""The select stage: every configured method picks from the feature store, never re-encoding, and
each selection is written the same way under selection/<method>/ (stages/publish.py): a folder that
loads as a Hugging Face dataset, with the manifest (config, versions, model and SAE identity,
fingerprints, counts, what the method settled on, the coverage curve, and coverage against the
baselines at the same budget) written last.

The methods are raysel.methods' registry. The stage's resume key is derived: the method entries,
the settings they share, and a content fingerprint of every side input they read, so an edited
targets file redoes the selection.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysel.config import ModelStack, SelectConfig
from raysel.core import paths
from raysel.core.corpus import content_fingerprint
from raysel.core.fac import FACConfig
from raysel.core.features import FeatureStore, column_chunks
from raysel.core.storage import Storage
from raysel.methods import BASELINES, Context, Method, Pool, build
from raysel.stages.base import Done, Stage
from raysel.stages.publish import PART_ROWS, TOP_FEATURES, PickedRecords, write_selection

log = logging.getLogger(__name__)


# The driver holds the pool: its CSR's int32 entries, read once and in place (core/features.csr_by_id),
# and per sample its id (Arrow while read, then a Python string), its set's place and size, and its
# response length. Measured on the 10M-sample store of benchmarks/select_stage.py (62.5 activated
# features and 9 characters of id a sample): reading it peaked 4.98 GiB over the process's start,
# the 2.33 GiB of entries and 284 B a sample, of which the id is held about three times. The driver
# process itself is charged 1 GiB: with Ray's client it held 0.68 GB before the statistics at 1M
# samples, and 1.13 GB after them (what their merge allocated is not all handed back).
DRIVER_BYTES = 2**30
BYTES_PER_ACTIVATED = 4
BYTES_PER_ROW = 260
BYTES_PER_ID_CHAR = 3
# After the methods, the picks' original records are spilled to local files in one pass over the
# prepared shards, a part (publish.PART_ROWS records) a batch, and each selection is written from them a
# part at a time: a part parsed (about 9 times its JSON) beside a batch of the shards, and about 300 B a
# pick that the writer and the spill keep. Measured: 3 selections of 100k picks from 600k prepared rows
# of the shared pool (750 B each), 0.25 GB; held whole, the picks' records took 0.28 GB before the
# writing began, and parsed whole 1.35 GB more for 300k.
BYTES_PER_PICK = 300
PART_COPIES = 10


def check_driver_memory(
    stats: dict,
    methods: dict[str, int] | None = None,
    available: int | None = None,
    id_chars: float = 9,
    remedies: dict[str, str] | None = None,
) -> dict:
    """Refuse, before reading it, a pool the driver cannot hold: an estimate from the statistics'
    counts and the ids' mean length, plus the largest of what the methods hold beside it (they run one
    after another), against the memory free on this machine. The refusal names the heaviest method's
    remedy (from `remedies`; by default, leaving it out)."""
    import psutil

    methods = {m: b for m, b in (methods or {}).items() if b}
    rows = stats["n_samples"]
    activated = stats.get("n_activated", round(stats["mean_features_per_sample"] * rows))
    pool = DRIVER_BYTES + BYTES_PER_ACTIVATED * activated + round((BYTES_PER_ROW + BYTES_PER_ID_CHAR * id_chars) * rows)
    heaviest = max(methods, key=methods.get, default=None)
    need = pool + methods.get(heaviest, 0)
    available = psutil.virtual_memory().available if available is None else available
    found = {"rows": rows, "activated": activated, "driver_gb": _gb(need), "available_gb": _gb(available),
             "methods_gb": {m: _gb(b) for m, b in methods.items()}}  # fmt: skip
    if need > available:
        beside = ", ".join(f"{m} {_gb(b)} GB" for m, b in sorted(methods.items(), key=lambda mb: -mb[1]))
        raise MemoryError(
            f"select: the pool ({rows:,} samples, {activated:,} activated features at tau {stats['tau']:g}) needs "
            f"about {_gb(pool)} GB on the driver{f' and, beside it, {beside}' if beside else ''}; this machine has "
            f"{found['available_gb']} GB free. {(remedies or {}).get(heaviest, leave_out(heaviest))}"
            f"Activate fewer features a sample (a lower activation.target_active, or a higher activation.tau), "
            f"run the driver on a larger head node, or set select.memory_check: false to try anyway"
        )
    return found


def mean_record_bytes(storage: Storage) -> float:
    """The original records' mean size in bytes, from the prepared shards' parquet footers."""
    size = rows = 0
    for fragment in pq.ParquetDataset(storage.path(paths.PREPARED), filesystem=storage.fs).fragments:
        rows += fragment.metadata.num_rows
        size += sum(chunk.total_uncompressed_size for chunk in column_chunks(fragment.metadata, "record"))
    return size / max(rows, 1)


def leave_out(method: str | None) -> str:
    return f"Leave {method} out of select.methods (or run it on a smaller corpus). " if method else ""


def _gb(n: int) -> float:
    return round(n / 2**30, 2)


def resolve_budget(budget: float, n: int) -> int:
    return min(n, int(budget) if budget >= 1 else max(1, round(budget * n)))


class Select(Stage):
    name = "select"
    needs = ("prepare", "encode", "stats")  # and what its methods need (task_features for method fac)
    brief = ("budgets", "methods")

    def __init__(
        self,
        select: SelectConfig,
        fac: FACConfig,
        stack: ModelStack,
        storage: Storage,
        run: dict,
        side_stores: Callable[[dict[str, list[str]], float], dict[str, FeatureStore]],
    ):
        """`run`: what every selection's manifest carries of the run (config, versions, model);
        `side_stores(sets, tau)` encodes the methods' side inputs (paths by name) through the plan and
        returns their stores by name."""
        self.select, self.fac, self.stack, self.storage = select, fac, stack, storage
        self.run_info, self.side_stores = run, side_stores
        self.methods = [build(entry) for entry in select.methods]
        self.needs = (*Select.needs, *sorted({n for m in self.methods for n in m.needs}))

    def context(self, done: Done) -> Context:
        stats, task = done["stats"], done.get("task_features", {})
        features = task.get("features")
        return Context(
            tau=stats["tau"],
            seed=self.select.seed,
            d_sae=stats["d_sae"],
            storage=self.storage,
            stack=self.stack,
            fac=self.fac,
            side_set=lambda name, paths_: self.side_stores({name: paths_}, stats["tau"])[name],
            task_features=None if features is None else np.array(features, dtype=np.int64),
            fac_tau=task.get("tau"),
        )

    def side_sets(self) -> dict[str, list[str]]:
        """Every method's side inputs, encoded before select in one pass (with the run's own when that is
        due). Two methods' sets of the same name but other paths: the first here, the other when picked."""
        sets: dict[str, list[str]] = {}
        for method in self.methods:
            sets |= {n: p for n, p in method.side_inputs(self.fac).items() if p and n not in sets}
        return sets

    def key(self, done: Done) -> dict:
        ctx = self.context(done)
        side = {m.name: m.side_inputs(self.fac) for m in self.methods}
        # the side inputs' paths as written are left out: their content fingerprints (of the resolved
        # files) stand for them, so the same files named another way do not redo the selection
        methods = [m.cfg.model_dump(mode="json", exclude=set(side[m.name])) for m in self.methods]
        return {
            "encode_fingerprint": done["encode"]["fingerprint"],
            "tau": ctx.tau,
            "select": self.select.model_dump(mode="json", exclude={"methods"}) | {"methods": methods},
            "side_inputs": {
                m: {name: content_fingerprint(p, self.stack.s3) for name, p in inputs.items() if p}
                for m, inputs in side.items()
            },
        } | ({"task_features": [ctx.task_features.tolist(), ctx.fac_tau]} if "task_features" in done else {})

    def manifest_base(self, done: Done) -> dict:
        """What every selection's manifest carries of the run's: config, versions, model, SAE, counts, fingerprints."""
        prepared, encoded = done["prepare"], done["encode"]
        return self.run_info | {
            "counts": run_counts(done),
            "sae": encoded["sae"],
            "layer": encoded["layer"],
            "fingerprints": {"prepare": prepared["fingerprint"], "encode": encoded["fingerprint"]},
        }

    def budget(self, method: Method, n: int) -> int:
        return resolve_budget(method.cfg.budget or self.select.budget, n)

    def check_memory(self, store: FeatureStore, ctx: Context) -> dict:
        stats = store.summary()
        budgets = {m.name: self.budget(m, stats["n_samples"]) for m in self.methods}
        beside = {m.name: m.driver_bytes(store, budgets[m.name], ctx) for m in self.methods}
        picked = min(sum(budgets.values()), stats["n_samples"])
        mean = mean_record_bytes(self.storage)
        beside["records"] = round(picked * BYTES_PER_PICK + PART_COPIES * min(PART_ROWS, picked) * mean)
        remedies = {m.name: m.memory_remedy for m in self.methods if m.memory_remedy}
        remedies["records"] = "Pick fewer samples (a lower select.budget, or fewer methods). "
        return check_driver_memory(stats, beside, id_chars=store.mean_id_length(), remedies=remedies)

    def run(self, done: Done) -> dict:
        start, ctx, base = time.time(), self.context(done), self.manifest_base(done)
        store = FeatureStore(self.storage)
        memory = self.check_memory(store, ctx) if self.select.memory_check else None
        pool = read_pool(store, ctx.tau)
        n, indices = len(pool.ids), pool.indices
        budgets = {m.name: self.budget(m, n) for m in self.methods}
        log.info("select: %d samples, %d activated features, %.1f per sample (tau %g), budgets %s", n,
                 pool.n_features, indices.size / max(n, 1), ctx.tau, budgets)  # fmt: skip
        picks, seconds = {}, {}
        for method in self.methods:
            began = time.time()
            chosen = method.pick(pool, budgets[method.name], ctx)
            seconds[method.name] = round(time.time() - began, 2)
            log.info("select: %s picked %d in %.1fs", method.name, len(chosen.ids), seconds[method.name])
            order = pool.rows_of(chosen.ids)
            picks[method.name] = (order, chosen, *coverage_curve(order, pool.indptr, indices, pool.n_features))
        baselines = {
            str(k): baseline_coverage(
                pool, k, ctx, {m: picks[m][3][-1]["coverage"] for m in budgets if budgets[m] == k}
            )
            for k in set(budgets.values())
        }
        at_budget = {}
        strongest = store.strongest(np.unique(np.concatenate([pool.ids[o] for o, *_ in picks.values()])).tolist(),
                                    TOP_FEATURES)  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="raysel-picks-") as spill:
            records = PickedRecords(self.storage, {name: pool.ids[order] for name, (order, *_) in picks.items()}, spill)
            for name, k in budgets.items():
                order, chosen, new, curve = picks[name]
                at_budget[name] = baselines[str(k)] | {
                    m: picks[m][3][-1]["coverage"] for m in budgets if budgets[m] == k
                }
                write_selection(self.storage, name, pool.ids[order], chosen.scores, new, records.of(name), {
                    **base, "method": name, "budget": k, "tau": ctx.tau, **chosen.details,
                    "counts": {**base["counts"], "n_selected": int(len(order))},
                    "objective_curve": curve, "coverage_at_budget": at_budget[name],
                }, strongest["sae_features"].take(pc.index_in(pa.array(pool.ids[order], pa.string()), value_set=strongest["id"])))  # fmt: skip
        summary = {
            "budgets": budgets,
            "n_features_activated": pool.n_features,
            "methods": {m: at_budget[m][m] for m in budgets},
            "baselines": baselines,
            "driver_memory": memory,
            "seconds_by_method": seconds,
            # what each method read besides the pool (their prepared rows under <root>/<name>/), by
            # method: the evaluate stage keeps its eval sets apart from them
            "side_sets": {m.name: {n: p for n, p in m.side_inputs(self.fac).items() if p} for m in self.methods},
        }
        log.info("select: coverage %s against the baselines %s in %.1fs", summary["methods"], baselines,
                 time.time() - start)  # fmt: skip
        return summary


def run_counts(done: Done) -> dict:
    """The run's counts: every input row, kept or rejected, and what the encoder took."""
    prepared, encoded = done["prepare"], done.get("encode", {})
    return {k: prepared[k] for k in ("n_input", "n_blank_lines", "n_valid", "n_rejected", "rejected_by_reason")} | {
        k: encoded[k] for k in ("n_encoded", "n_encode_rejected") if k in encoded
    }


def baseline_coverage(pool: Pool, k: int, ctx: Context, measured: dict[str, float]) -> dict[str, float]:
    """The share of the pool's activated features each baseline covers with k picks (taken from
    `measured` when the run's own entry of that baseline already has this budget)."""
    out = {}
    for baseline in BASELINES:
        method = build(baseline.Config())
        if method.name in measured:
            out[method.name] = measured[method.name]
            continue
        order = pool.rows_of(method.pick(pool, k, ctx).ids)
        _, curve = coverage_curve(order, pool.indptr, pool.indices, pool.n_features)
        out[method.name] = curve[-1]["coverage"]
    return out


def read_pool(store: FeatureStore, tau: float) -> Pool:
    taken_at = store.summary()["tau"]
    if taken_at != tau:  # the stage order makes this hold; a mismatch would pick from other sets
        raise RuntimeError(f"select: the statistics were taken at tau {taken_at}, not the run's {tau}")
    ids, indptr, indices = store.committed_activated_sets()
    prepared = pq.read_table(
        store.storage.path(paths.PREPARED), columns=["id", "n_response_tokens"], filesystem=store.storage.fs
    )
    rows = pc.index_in(pa.array(ids, pa.string()), value_set=prepared["id"]).to_numpy()
    return Pool(ids, indptr, indices, prepared["n_response_tokens"].to_numpy()[rows], store)


def coverage_curve(order: np.ndarray, indptr, indices, total: int, points: int = 20) -> tuple[np.ndarray, list[dict]]:
    """Features each pick adds to the running union, and the share of the pool's `total` activated
    features covered at checkpoints."""
    d = int(indices.max()) + 1 if indices.size else 1
    new = _new_features(np.asarray(order, np.int64), indptr, indices, d)
    covered = np.cumsum(new)
    marks = sorted({max(1, round(len(order) * p / points)) for p in range(1, points + 1)})
    return new, [{"k": m, "coverage": round(float(covered[m - 1]) / max(total, 1), 4)} for m in marks]


@numba.njit(cache=True)
def _new_features(order, indptr, indices, d):
    # one pass over the picks' entries: 0.46 s for 100k picks of a 1M pool, where a numpy loop
    # over the picks took 4.3 s and a sort of their entries (np.unique) 1.2 s
    seen = np.zeros(d, np.bool_)
    new = np.zeros(len(order), np.int64)
    for rank in range(len(order)):
        for e in range(indptr[order[rank]], indptr[order[rank] + 1]):
            if not seen[indices[e]]:
                seen[indices[e]] = True
                new[rank] += 1
    return new
