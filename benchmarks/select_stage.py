"""The select stage at scale: `raysel select`, then `raysel report`, on a feature store of --rows
samples, through the CLI's own entry point on a real local Ray cluster, prepare and encode already
committed.

The store is synthetic and written in the real on-disk layout: an input JSONL, prepared/ shards
with token counts and records, features/ shards with their markers, and the prepare marker, each
under the fingerprints the real stages compute (so `raysel select` skips prepare and encode by its
own rules and runs tau, stats and select for real; the report follows as its own command). Its density is the one the default
encode writes, every positive max-pooled feature stored: each row holds feature j with probability
min(0.9, c / rank_j) (Zipf popularity over d_sae = 16,384, ids shuffled), times a per-row factor
that grows with its length, c set so a row stores about --stored (1,000) features; max-pools are a
per-feature scale times a lognormal tail, sum-pools a multiple of them. tau is calibrated to
--active (64) activated features a row, as the default config calibrates it. The texts and records
cycle through the bundled demo corpus (the report's spans read them). The model is the embedded
default; the SAE is a TopK SAE of the model's width with d_sae 16,384 and random weights (the
store never came from it; the report's spans and the side sets run it).

Measured, side by side in the one run: `raysel select` with coverage, random and longest (seconds
per stage and per method, the driver's peak RSS from its own getrusage, the peak summed RSS of the
Ray worker processes, sampled every 0.2 s; with --cold the page cache is dropped first, so the
store comes from disk); `raysel report`; SimScale in a select of its own, killed past
--simscale-cap; SimScale's kept set against a random one on the first --compare-rows samples;
and, with --side, MONA and FAC-select against 16 targets / anchors from the demo corpus in another
select on the same store. With --thin, every row stores only its 64 largest (as encode.top_m: 64
writes).

With --stored below 128 a shard's features are drawn by weight (Poisson counts a row, repeats dropped)
instead of through an n x d_sae matrix of coin flips: the same popularity, up to its 0.9 cap, at a
cost a 10M-row build can pay. --nodes N runs every select on a local multi-node
ray.cluster_utils.Cluster of N nodes sharing this machine's CPUs; --coverage-only stops after the
main select.

    python benchmarks/select_stage.py --rows 1000000 --cold    # the 1M target (store build ~5 min)
    # the 10M RandGreeDi stretch:
    python benchmarks/select_stage.py --rows 10000000 --stored 64 --budget 0.01 --nodes 2 --coverage-only --cold --no-memory-check
    python benchmarks/select_stage.py --rows 20000 --side      # a few minutes

The last line printed is one JSON object.
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py shadows the stdlib's `select` for scripts run from this folder
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

D_SAE = 16_384
ROWS_PER_FILE = 8192
SPARSE_DRAW_BELOW = 128  # stored features a row: below it a shard's draw is sparse (the 10M store's)


def bench_config(root: Path, args, methods: list, extra: dict | None = None) -> dict:
    return {
        "input": {"paths": [str(root / "input.jsonl")], "fields": {"id": "id"}},
        "prepare": {"max_tokens": 256, "rows_per_file": ROWS_PER_FILE},
        "model": {"name": "embedded:smollm2-135m-instruct", "dtype": "float32"},
        # random weights: the fit check would rightly refuse them when the side sets are encoded
        "sae": {"path": str(root.parent / f"{root.name}-sae"), "allow_poor_fit": True},
        "encode": {"top_m": 64 if args.thin else None},
        "activation": {"target_active": args.active},
        "select": {"methods": methods, "budget": args.budget, "memory_check": not args.no_memory_check},
        "output": {"root": str(root / "run")},
    } | (extra or {})


def popularity(seed: int, stored: float) -> tuple[np.ndarray, np.ndarray]:
    """Per feature: the chance a row stores it (Zipf over shuffled ids, scaled to `stored` a row), its scale."""
    rng = np.random.default_rng(seed)
    rank = rng.permutation(D_SAE) + 1.0
    lo, hi = 0.0, float(D_SAE)
    for _ in range(60):  # c such that sum(min(0.9, c / rank)) == stored
        c = (lo + hi) / 2
        lo, hi = (c, hi) if np.minimum(0.9, c / rank).sum() < stored else (lo, c)
    return np.minimum(0.9, c / rank), rng.lognormal(0.0, 0.5, D_SAE)


def sparse_draw(rng, p: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row i stores about expected[i] distinct features, feature j drawn with weight p_j (with
    replacement, each row's repeats then dropped, so more are drawn): (rows, features), ascending."""
    w = p / p.sum()
    draws = np.geomspace(1, 64 * expected.max(), 512)
    distinct = (1 - np.exp(-draws[:, None] * w[None, :])).sum(1)  # expected distinct features of m draws
    rows = np.repeat(np.arange(len(expected)), rng.poisson(np.interp(expected, distinct, draws)))
    feats = np.searchsorted(np.cumsum(w), rng.random(rows.size), side="right").clip(0, D_SAE - 1)
    unique = np.unique(rows.astype(np.int64) * D_SAE + feats)
    return unique // D_SAE, unique % D_SAE


def write_shard(task: tuple) -> tuple[str, int, int]:
    """One prepared shard and its feature shard: rows [start, stop)."""
    root, shard, start, stop, stored, thin, seed = task
    rng = np.random.default_rng([seed, shard])
    p, scale = popularity(seed, stored)
    demo = DEMO_ROWS
    n = stop - start
    n_tokens = np.clip(rng.lognormal(5.0, 0.6, n), 16, 256).astype(np.int32)
    length = (n_tokens / n_tokens.mean()) ** 0.3  # longer samples store more features
    if stored <= SPARSE_DRAW_BELOW:  # the same popularity by weighted draws: no n x d_sae matrix a shard
        rows, feats = sparse_draw(rng, p, stored * length)
    else:
        rows, feats = np.nonzero(rng.random((n, D_SAE), dtype=np.float32) < p[None, :] * length[:, None])
    vmax = (scale[feats] * rng.lognormal(0.0, 0.75, feats.size)).astype(np.float32)
    vsum = (vmax * (1.0 + rng.exponential(4.0, feats.size))).astype(np.float32)
    if thin:  # the 64 largest of each row, as encode.top_m keeps them, in ascending feature order
        order = np.lexsort((-vmax, rows))
        rank = np.arange(rows.size) - np.repeat(np.r_[0, np.cumsum(np.bincount(rows, minlength=n))[:-1]],
                                                np.bincount(rows, minlength=n))  # fmt: skip
        keep = np.sort(order[rank < 64])
        rows, feats, vmax, vsum = rows[keep], feats[keep], vmax[keep], vsum[keep]
    offsets = pa.array(np.r_[0, np.cumsum(np.bincount(rows, minlength=n))].astype(np.int32))
    ids = [f"s{i:08d}" for i in range(start, stop)]
    name = f"part-{shard:05d}.parquet"
    from raysel.core.features import FEATURE_SCHEMA
    from raysel.stages.prepare import PREPARED_SCHEMA

    features = pa.table(
        {
            "id": ids,
            "n_tokens": pa.array(n_tokens),
            "feat_ids": pa.ListArray.from_arrays(offsets, pa.array(feats.astype(np.int32))),
            "feat_max": pa.ListArray.from_arrays(offsets, pa.array(vmax)),
            "feat_sum": pa.ListArray.from_arrays(offsets, pa.array(vsum)),
        },
        schema=FEATURE_SCHEMA,
    )
    pq.write_table(features, root / "run" / "features" / name)
    records = [demo[i % len(demo)] | {"id": ids[k]} for k, i in enumerate(range(start, stop))]
    texts = [f"user: {r.get('instruction', '')}\nassistant: {r.get('output', '')}" for r in records]
    prepared = pa.table(
        {
            "id": ids,
            "shape": ["alpaca"] * n,
            "messages": pa.nulls(n, PREPARED_SCHEMA.field("messages").type),
            "text": texts,
            "n_tokens": n_tokens,
            "n_tokens_full": n_tokens,
            "truncated": np.zeros(n, bool),
            "n_response_tokens": (n_tokens * 0.6).astype(np.int32),
            "content_hash": [f"h{i:08d}" for i in range(start, stop)],
            "source": [str(root / "input.jsonl")] * n,
            "row": np.arange(start, stop, dtype=np.int64),
            "record": [json.dumps(r, ensure_ascii=False) for r in records],
        },
        schema=PREPARED_SCHEMA,
    )
    pq.write_table(prepared, root / "run" / "prepared" / name)
    return name, n, int(n_tokens.sum())


def load_demo() -> list[dict]:
    from raysel.core.paths import demo_data

    return [json.loads(line) for line in Path(demo_data()).read_text().splitlines()]


DEMO_ROWS = load_demo()


def save_sae(path: Path) -> None:
    """A TopK SAE of the default model's width and layer, d_sae 16,384, random weights, as sae-lens saves it."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from raysel.config import TrainSAEConfig

    layer = TrainSAEConfig().layer
    import torch

    torch.manual_seed(0)
    cfg = TopKSAEConfig(d_in=576, d_sae=D_SAE, k=64, metadata=SAEMetadata(hook_name=f"model.layers.{layer}"))
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 576**-0.5)
        sae.W_dec.copy_(sae.W_enc.T)
    sae.save_model(path)


def build_store(root: Path, args) -> dict:
    """The store, once per (rows, stored, thin, seed); a finished one is reused."""
    params = {"rows": args.rows, "stored": args.stored, "thin": args.thin, "seed": args.seed, "version": 1}
    if (root / "store.json").exists() and json.loads((root / "store.json").read_text()) == params:
        return params
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    for sub in ("run/features/_done", "run/prepared", "run/stages"):
        (root / sub).mkdir(parents=True)
    save_sae(root.parent / f"{root.name}-sae")
    start = time.time()
    with open(root / "input.jsonl", "w") as f:
        for i in range(args.rows):
            f.write(json.dumps(DEMO_ROWS[i % len(DEMO_ROWS)] | {"id": f"s{i:08d}"}, ensure_ascii=False) + "\n")
    tasks = [
        (root, s, lo, min(lo + ROWS_PER_FILE, args.rows), args.stored, args.thin, args.seed)
        for s, lo in enumerate(range(0, args.rows, ROWS_PER_FILE))
    ]
    with mp.get_context("spawn").Pool(os.cpu_count()) as pool:
        shards = pool.map(write_shard, tasks)
    commit_markers(root, args, shards)
    (root / "store.json").write_text(json.dumps(params))
    print(f"store: {args.rows:,} rows in {len(shards)} shards, built in {time.time() - start:.0f} s", flush=True)
    return params


def commit_markers(root: Path, args, shards: list) -> None:
    """The prepare marker and the shard markers, under the keys the real stages compute."""
    from raysel.config import RunConfig
    from raysel.core import paths
    from raysel.core.storage import Storage
    from raysel.stages.encode import Encode
    from raysel.stages.prepare import Prepare

    cfg = RunConfig.model_validate(bench_config(root, args, ["coverage"]))
    storage = Storage(cfg.output.root, cfg.s3)
    prepare = Prepare(cfg.input, cfg.prepare, cfg.model, cfg.s3, storage)
    summary = {"n_input": args.rows, "n_blank_lines": 0, "n_valid": args.rows, "n_rejected": 0,
               "rejected_by_reason": {}, "fingerprint": prepare.fingerprint, "seconds": None,
               "files": [f.path for f in prepare.files]}  # fmt: skip
    storage.write_json(paths.marker("prepare"), {**summary, "key": prepare.key({})})
    encode = Encode(cfg.stack(), storage)
    for name, rows, tokens in shards:
        storage.write_json(paths.shard_marker(name), {"rows": rows, "tokens": tokens, "seconds": 0.0,
                                                      "key": {"fingerprint": encode.fingerprint(summary)}})  # fmt: skip


def cli(argv: list[str], cap: float | None = None) -> dict:
    """raysel.cli.main(argv) in a child: its seconds, its own peak RSS, and its Ray workers' (sampled).
    Past `cap` seconds the child and everything it started are killed: {"finished": False}."""
    code = (
        "import resource, sys\nfrom raysel.cli import main\n"
        f"rc = main({argv!r})\n"
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\nsys.exit(rc)"
    )
    start = time.time()
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    workers = WorkerSampler(os.getpid())  # the child's Ray workers, or those of a cluster this process started
    try:
        out, _ = child.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        family = [child, *psutil.Process(child.pid).children(recursive=True)]
        for p in family:
            p.kill()
        child.wait()
        workers.stop()
        return {"finished": False, "seconds": time.time() - start}
    workers.stop()
    if child.returncode:
        raise SystemExit(f"raysel {' '.join(argv)} failed with {child.returncode}")
    peak = next(int(line.split()[1]) for line in out.splitlines() if line.startswith("PEAK_RSS_KB"))
    return {"finished": True, "seconds": time.time() - start, "driver_peak_rss_gb": peak / 1e6,
            "workers_peak_rss_gb": workers.peak / 1e9}  # fmt: skip


def select(config: dict, root: Path, name: str, cap: float | None = None) -> dict:
    """`raysel select CONFIG`, and the manifest it wrote."""
    import yaml

    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    (root / "run" / "stages" / "select.json").unlink(missing_ok=True)
    measured = cli(["select", str(path)], cap)
    if not measured["finished"]:
        return measured
    return measured | {"manifest": json.loads((Path(config["output"]["root"]) / "manifest.json").read_text())}


class WorkerSampler:
    """The peak, over time, of the summed RSS of a process's Ray workers."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.done = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.done.wait(0.2):
            try:
                procs = psutil.Process(self.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    if p.name().startswith("ray::") or "default_worker" in " ".join(p.cmdline()):
                        total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def picked_details(root: Path, method: str) -> dict:
    """What a selection's manifest says the method settled on (RandGreeDi's partitions and objectives)."""
    manifest = json.loads((root / "run" / "selection" / method / "manifest.json").read_text())
    keys = ("distributed", "partitions", "n_candidates", "objective_merged", "objective_best_partition", "answer")
    return {k: manifest[k] for k in keys if k in manifest}


def local_cluster(nodes: int):
    """A local multi-node Ray cluster (ray.cluster_utils), the CPUs split among its nodes; the CLI
    children join it through RAY_ADDRESS."""
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    for _ in range(nodes):
        cluster.add_node(num_cpus=max(1, (os.cpu_count() or 2) // nodes), object_store_memory=2 * 10**9)
    os.environ["RAY_ADDRESS"] = cluster.address
    return cluster


def drop_page_cache() -> None:
    """Written data to disk, then the kernel's clean page cache dropped (needs root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as e:
        raise SystemExit(f"--cold: cannot drop the page cache ({e}); run as root, or leave --cold out") from e


def stored_per_row(root: Path) -> float:
    from raysel.config import S3Config
    from raysel.core.features import FeatureStore
    from raysel.core.storage import Storage

    rows, stored = FeatureStore(Storage(str(root / "run"), S3Config())).counts()
    return stored / rows


PAIRS_EXACT = 20_000  # kept samples whose mean pairwise Jaccard is taken over every pair


def simscale_quality(root: Path, tau: float, rows: int) -> dict:
    """SimScale on the store's first `rows` samples at the run's tau (budget 10 %): its seconds, kept
    count and theta, and the mean pairwise Jaccard of its kept set against a random set's."""
    import scipy.sparse as sp

    from raysel.core.features import activated_entries
    from raysel.methods.simscale_kernel import simscale

    tables, n = [], 0
    for path in sorted((root / "run" / "features").glob("*.parquet")):
        if n >= rows:
            break
        tables.append(pq.read_table(path, columns=["feat_ids", "feat_max"]))
        n += tables[-1].num_rows
    table = pa.concat_tables(tables).slice(0, rows)
    r, feats, _ = activated_entries(table, tau)
    indptr = np.r_[0, np.cumsum(np.bincount(r, minlength=table.num_rows))]
    x = sp.csr_matrix((np.ones(feats.size, np.float32), feats, indptr), shape=(table.num_rows, D_SAE))
    budget = table.num_rows // 10

    def mean_jaccard(kept: np.ndarray) -> float:
        """Over every pair of the kept set; past PAIRS_EXACT kept samples, over 2M random pairs (the
        dense pair matrix of 100k would take 40 GB; the estimate's standard error is below 0.1 %)."""
        size = np.diff(x.indptr).astype(np.float32)
        if len(kept) <= PAIRS_EXACT:
            sub = x[kept]
            shared = (sub @ sub.T).toarray()
            jaccard = shared / np.maximum(size[kept][:, None] + size[kept][None, :] - shared, 1)
            return float(jaccard[np.triu_indices(len(kept), 1)].mean())
        a, b = np.random.default_rng(0).integers(0, len(kept), (2, 2_000_000))
        a, b = kept[a[a != b]], kept[b[a != b]]
        shared = np.concatenate(
            [np.asarray(x[a[i : i + 100_000]].multiply(x[b[i : i + 100_000]]).sum(1)).ravel()
             for i in range(0, len(a), 100_000)]
        )  # fmt: skip
        return float(np.mean(shared / np.maximum(size[a] + size[b] - shared, 1)))

    simscale(indptr[:101], feats[: indptr[100]], 10)  # compile off the clock
    start = time.perf_counter()
    kept = simscale(indptr, feats, budget)
    out = {"rows": table.num_rows, "budget": budget, "seconds": round(time.perf_counter() - start, 1),
           "kept": len(kept.order), "theta": kept.theta, "mean_jaccard": round(mean_jaccard(kept.order), 5)}  # fmt: skip
    out["random_mean_jaccard"] = round(mean_jaccard(np.random.default_rng(0).permutation(table.num_rows)[:budget]), 5)
    out["mean_jaccard_vs_random"] = round(out["mean_jaccard"] / out["random_mean_jaccard"], 4)
    return out


def side_sets(root: Path) -> dict:
    """16 targets and 16 anchors from the demo corpus (math, then code), for MONA and FAC-select."""
    written = {}
    for name, category in (("targets", "math"), ("anchor", "code")):
        rows = [r for r in DEMO_ROWS if r.get("category") == category][:16]
        path, text = root / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
        if not path.exists() or path.read_text() != text:  # its mtime keys the side set's encode: keep it
            path.write_text(text)
        written[name] = str(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stored", type=float, default=1000.0, help="stored features a row, on average")
    parser.add_argument("--active", type=float, default=64.0, help="activation.target_active")
    parser.add_argument("--thin", action="store_true", help="store each row's 64 largest only (encode.top_m: 64)")
    parser.add_argument("--side", action="store_true", help="also MONA and FAC-select, in a second select")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--simscale-cap", type=float, default=600.0, help="seconds SimScale's own select may take")
    parser.add_argument("--compare-rows", type=int, default=100_000, help="SimScale against random on this many")
    parser.add_argument("--out", type=Path, default=Path("runs/select_stage"))
    parser.add_argument("--budget", type=float, default=0.1, help="select.budget")
    parser.add_argument("--coverage-only", action="store_true", help="the main select alone: no report, no SimScale")
    parser.add_argument("--randgreedi-rows", type=int, default=2_000_000, help="coverage.distributed_rows")
    parser.add_argument("--no-memory-check", action="store_true", help="select.memory_check: false")
    parser.add_argument("--nodes", type=int, default=0, help="run on a local multi-node ray.cluster_utils.Cluster")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before `raysel select` (root): the store comes from disk",
    )
    args = parser.parse_args()
    root = (args.out / f"{args.rows}{'-thin' if args.thin else ''}").resolve()
    build_store(root, args)
    cluster = local_cluster(args.nodes) if args.nodes else None
    try:
        print(json.dumps(measure(root, args)))
    finally:
        if cluster is not None:
            cluster.shutdown()


def measure(root: Path, args) -> dict:
    """The main select (with the store read from disk under --cold), then, unless --coverage-only,
    the report, SimScale alone, SimScale's quality, and with --side MONA and FAC-select."""
    from raysel.pipeline import STAGES

    for stale in [*(f"stages/{name}.json" for name in STAGES[STAGES.index("tau") :]), "manifest.json"]:
        (root / "run" / stale).unlink(missing_ok=True)  # every stage after encode runs again
    if args.cold:
        drop_page_cache()
    coverage = {"name": "coverage", "distributed_rows": args.randgreedi_rows}  # auto: RandGreeDi past it
    main_run = select(bench_config(root, args, [coverage, "random", "longest"]), root, "select")
    stages = main_run["manifest"]["stages"]
    result = {
        "rows": args.rows,
        "stored_per_row": round(stored_per_row(root), 1),
        "activated_per_row": stages["stats"]["mean_features_per_sample"],
        "thin": args.thin,
        "page_cache": "dropped before select" if args.cold else "as found",
        "seconds_total": round(main_run["seconds"], 1),
        "seconds_by_stage": {s: stages[s].get("seconds") for s in ("tau", "stats", "select") if s in stages},
        "seconds_by_method": stages["select"]["seconds_by_method"],
        "driver_peak_rss_gb": round(main_run["driver_peak_rss_gb"], 2),
        "workers_peak_rss_gb": round(main_run["workers_peak_rss_gb"], 2),
        "coverage": stages["select"]["methods"],
        "coverage_details": picked_details(root, "coverage"),
        "cores": os.cpu_count(),
        "nodes": args.nodes or 1,
        "memory_check": stages["select"].get("driver_memory"),
    }
    if args.coverage_only:
        return result
    report = cli(["report", str(root / "run")])
    result |= {
        "report_s": round(report["seconds"], 1),
        "report_driver_peak_rss_gb": round(report["driver_peak_rss_gb"], 2),
    }
    alone = select(bench_config(root, args, ["simscale"]), root, "simscale", cap=args.simscale_cap)
    result["simscale_s"] = alone["manifest"]["stages"]["select"]["seconds_by_method"]["simscale"] if alone[
        "finished"] else None  # fmt: skip
    result["simscale_run"] = {
        "finished": alone["finished"],
        "seconds": round(alone["seconds"], 1),
        "cap": args.simscale_cap,
    }
    if alone["finished"]:
        result["simscale_run"]["driver_peak_rss_gb"] = round(alone["driver_peak_rss_gb"], 2)
    if args.compare_rows:
        result["simscale_quality"] = simscale_quality(root, stages["tau"]["tau"], args.compare_rows)
    if args.side:
        side = side_sets(root)
        methods = [{"name": "mona", "targets": [side["targets"]]}, "fac"]
        extra = {"fac": {"anchor": [side["anchor"]], "features": list(range(0, D_SAE, 331))}}
        second = select(bench_config(root, args, methods, extra), root, "side")
        result["side_seconds_by_method"] = second["manifest"]["stages"]["select"]["seconds_by_method"]
        result["side_driver_peak_rss_gb"] = round(second["driver_peak_rss_gb"], 2)
    return result


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
    sys.exit(main())
