"""FAC on real data: how coverage of an anchor set's task features grows with a dataset, what
each selection method reaches at one budget, and what FAC Synthesis adds.

With the default model and SAE, tau calibrated to 32 activated features per sample (delta = tau):

1. FAC of random subsets of the pool of growing size (seeded);
2. FAC of `coverage`, `fac` and `random` selections at one budget (--budget), F being the
   --n-features features most enriched on the anchor over `fac.reference` (the bundled P3
   reference by default), not over the pool: the same F, at F's own tau (calibrated on the
   reference), for every dataset measured;
3. `raysel synthesize` on a random --synth-size subset of the pool as the evaluated set, with the
   default generator on up to 20 missing features: acceptance rate at delta, FAC gained, and the
   time per accepted sample (--no-synthesis leaves it out: it encodes the reference again in a
   root of its own and generates for about 10 minutes on 2 CPU cores).

The pool is encoded once into --out (shared with benchmarks/task_select.py when both use the
same --out and --max-tokens) and reused.

    python benchmarks/fac.py [--pool ../shared/data/pool.jsonl] [--anchor ../shared/data/targets_math.jsonl]

The last line printed is one JSON object.
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py shadows the stdlib's `select` for scripts run from this folder
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from raysel.config import RunConfig  # noqa: E402
from raysel.core import paths  # noqa: E402
from raysel.core.fac import fac  # noqa: E402
from raysel.core.features import FeatureStore, Profile  # noqa: E402
from raysel.core.storage import Storage  # noqa: E402
from raysel.pipeline import run  # noqa: E402


def subset(table: pa.Table, ids: list[str]) -> pa.Table:
    return table.filter(pc.is_in(table["id"], pa.array(ids, pa.string())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default="../shared/data/pool.jsonl")
    parser.add_argument("--anchor", nargs="+", default=["../shared/data/targets_math.jsonl"])
    parser.add_argument("--out", default="runs/task_bench")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--synth-size", type=int, default=50)  # small enough to miss ~20 anchor features
    parser.add_argument("--synth-features", type=int, default=20)
    parser.add_argument("--no-synthesis", action="store_true", help="leave out step 3")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    raw = {
        "input": {"paths": [args.pool], "fields": {"id": "id"}},
        "prepare": {"max_tokens": args.max_tokens},
        "encode": {"num_cpus": os.cpu_count() or 1},
        "output": {"root": args.out},
        "activation": {"target_active": 32},
        "select": {"methods": ["coverage", "fac", "random"], "budget": args.budget},
        "fac": {"anchor": args.anchor, "n_features": args.n_features},
    }
    run(RunConfig.model_validate(raw), until="select", train_missing_sae=True)
    storage = Storage(args.out, RunConfig.model_validate(raw).s3)
    pool, anchor = FeatureStore(storage).table(), FeatureStore(Storage(storage.uri("anchor"), storage.s3)).table()
    d_sae = storage.read_json("stats/summary.json")["d_sae"]
    task_features = storage.read_json(paths.marker("task_features"))
    features, tau = np.array(task_features["features"], dtype=np.int64), task_features["tau"]  # F's own tau

    def fac_of(ids: list[str]) -> float:
        return fac(Profile.of(anchor, tau, d_sae), Profile.of(subset(pool, ids), tau, d_sae), features)[0]["fac"]

    ids = pool["id"].to_pylist()
    order = np.random.default_rng(0).permutation(len(ids))
    sizes = [s for s in (25, 50, 100, 200, 500, 1000, 2000) if s < len(ids)] + [len(ids)]
    by_size = {s: round(fac_of([ids[i] for i in order[:s]]), 4) for s in sizes}
    print(
        f"\nanchor: {anchor.num_rows} examples; F: {features.size} features enriched on it over the reference "
        f"({task_features['source']}); tau {tau:.3g} ({task_features['tau_source']})"
    )
    print("FAC of random subsets:", ", ".join(f"{s}: {v:.3f}" for s, v in by_size.items()))
    picked = {
        m: pq.read_table(os.path.join(args.out, "selection", m, "selected.parquet"))["id"].to_pylist()
        for m in ("coverage", "fac", "random")
    }
    at_budget = {m: round(fac_of(picked[m]), 4) for m in picked}
    print(f"FAC at budget {args.budget}: " + ", ".join(f"{m} {v:.3f}" for m, v in at_budget.items()), flush=True)

    synth = {}
    if not args.no_synthesis:
        evaluated = os.path.join(args.out, "synth_input.jsonl")
        wanted = {ids[i] for i in order[: args.synth_size]}
        with open(args.pool) as src, open(evaluated, "w") as dst:
            dst.writelines(line for line in src if json.loads(line)["id"] in wanted)
        synth_raw = raw | {
            "input": {"paths": [evaluated], "fields": {"id": "id"}},
            "output": {"root": os.path.join(args.out, "synth_run")},
            "select": {"methods": ["coverage"]},
            "synthesis": {"max_features": args.synth_features},
        }
        start = time.time()
        synth = run(RunConfig.model_validate(synth_raw), until="synthesis")["stages"]["synthesis"]
        print(
            f"synthesis on a {args.synth_size}-sample subset: FAC {synth['fac_before']:.3f} -> {synth['fac_after']:.3f} "
            f"({synth['missing_before']} -> {synth['missing_after']} missing); {synth['features_tried']} features tried, "
            f"{synth['acceptance_rate']:.0%} of step-2 candidates above delta, {synth['n_kept']} kept, "
            f"{synth['seconds_per_kept']} s per kept sample ({time.time() - start:.0f} s in all)",
            flush=True,
        )
    print(
        json.dumps(
            {
                "fac_by_random_size": by_size,
                "fac_coverage": at_budget["coverage"],
                "fac_fac": at_budget["fac"],
                "fac_random": at_budget["random"],
                "budget": args.budget,
                "n_features": int(features.size),
                "tau": tau,
            }
            | (
                {
                    "synth_acceptance_rate": round(synth["acceptance_rate"], 4),
                    "synth_fac_before": synth["fac_before"],
                    "synth_fac_after": synth["fac_after"],
                    "synth_kept": synth["n_kept"],
                    "synth_seconds_per_kept": synth["seconds_per_kept"],
                }
                if synth
                else {}
            )
        )
    )


if __name__ == "__main__":
    main()
