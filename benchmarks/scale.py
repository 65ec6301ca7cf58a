"""How raysel's cost grows, and what 10M samples on 8 GPUs would cost, from measurements here.

1. Encode throughput with 1 and then 2 encode actors (1 CPU each), the default model and SAE,
   through the real encode stage on --encode-samples samples of the pool (a fresh output root
   per setting; prepare is not timed). The baseline is the 1-actor run.
2. Selection time of `coverage` (one node) at n = 10k, 100k and 1M synthetic activated sets
   (benchmarks/select.py's Zipf generator: 64 features per row out of 16,384), budget n / 10.
3. RandGreeDi against the single-node greedy on the same data, by covered features (the
   objective), at budgets below saturation: a synthetic 100k store (4 partitions) and the real
   samples encoded in step 1 (2 partitions).
4. The cost of 10M samples on 8 GPUs, extrapolated from the per-sample costs above; every
   assumption is printed beside it.

    python benchmarks/scale.py [--pool ../shared/data/pool.jsonl] [--encode-samples 256]

The last line printed is one JSON object.
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py shadows the stdlib's `select` for scripts run from this folder
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from raysel.config import RunConfig  # noqa: E402
from raysel.core.features import FEATURE_SCHEMA, FeatureStore  # noqa: E402
from raysel.core.storage import Storage  # noqa: E402
from raysel.methods.coverage import CoverageConfig  # noqa: E402
from raysel.methods.coverage_kernel import greedy_coverage  # noqa: E402
from raysel.methods.randgreedi import covered_weight, randgreedi  # noqa: E402
from raysel.pipeline import run  # noqa: E402


@functools.cache
def select_benchmark():
    """benchmarks/select.py, loaded by path (once): that file's name shadows a stdlib module."""
    spec = importlib.util.spec_from_file_location("select_benchmark", Path(__file__).with_name("select.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def zipf_rows(n: int):
    return select_benchmark().zipf_rows(n)


def encode_run(out: Path, pool: Path, n: int, actors: int) -> dict:
    """The encode stage over the first n samples of the pool with `actors` actors of 1 CPU each."""
    sample = out / "encode_input.jsonl"
    if not sample.exists():
        with open(pool) as src:
            sample.write_text("".join(line for _, line in zip(range(n), src)))
    raw = {
        "input": {"paths": [str(sample)], "fields": {"id": "id"}},
        "prepare": {"max_tokens": 256, "rows_per_file": max(1, n // 8)},  # 8 shards to share out
        "encode": {"actors": actors, "num_cpus": 1},
        "output": {"root": str(out / f"encode_{actors}")},
        "activation": {"target_active": 32},
    }
    cfg = RunConfig.model_validate(raw)
    stage = run(cfg, until="encode", train_missing_sae=True)["stages"]["encode"]
    storage = Storage(cfg.output.root, cfg.s3)
    compute = sum(m["seconds"] for m in FeatureStore(storage).done_shards().values())
    return {
        "actors": actors,
        "samples": stage["n_encoded"],
        "tokens": stage["n_tokens"],
        "seconds": stage["seconds"],
        "samples_per_s": stage["n_encoded"] / stage["seconds"],
        "compute_s_per_sample": compute / stage["n_encoded"],
        "layer": stage["layer"],
        "storage": storage,
        "cfg": cfg,
    }


def time_select(n: int) -> float:
    indptr, indices = zipf_rows(n)
    greedy_coverage(indptr[:101], indices[: indptr[100]], 10)  # compile (or load numba's cache) off the clock
    start = time.perf_counter()
    greedy_coverage(indptr, indices, n // 10)
    return time.perf_counter() - start


def write_store(root: Path, indptr: np.ndarray, indices: np.ndarray, shards: int = 8) -> Storage:
    """Synthetic rows as a feature store (every listed feature at 1.0, so tau = 0 keeps them all)."""
    n = len(indptr) - 1
    offsets = pa.array(indptr.astype(np.int32))
    ones = pa.array(np.ones(indices.size, np.float32))
    table = pa.table(
        {
            "id": [f"r{i:08d}" for i in range(n)],
            "n_tokens": pa.array(np.ones(n, np.int32)),
            "feat_ids": pa.ListArray.from_arrays(offsets, pa.array(indices, pa.int32())),
            "feat_max": pa.ListArray.from_arrays(offsets, ones),
            "feat_sum": pa.ListArray.from_arrays(offsets, ones),
        },
        schema=FEATURE_SCHEMA,
    )
    storage = Storage(str(root), RunConfig.model_fields["s3"].default)
    (root / "features").mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, n, math.ceil(n / shards))):
        name = f"part-{s}.parquet"
        part = table.slice(start, math.ceil(n / shards))
        pq.write_table(part, root / "features" / name)
        storage.write_json(f"features/_done/{name}.json", {"rows": part.num_rows})
    return storage


def ratio(storage: Storage, tau: float, budget: int, partitions: int) -> dict:
    ids, indptr, indices = FeatureStore(storage).activated_sets(tau)
    single = greedy_coverage(indptr, indices, budget)
    start = time.perf_counter()
    picked, _, settled = randgreedi(FeatureStore(storage), tau, budget, partitions, seed=0, weights=None)
    seconds = time.perf_counter() - start
    rows = np.searchsorted(ids, np.asarray(picked, dtype=object))
    ours, theirs = covered_weight(indptr, indices, rows, None), covered_weight(indptr, indices, single.order, None)
    return {
        "n": len(ids),
        "budget": budget,
        "partitions": partitions,
        "single": theirs,
        "randgreedi": ours,
        "ratio": ours / theirs,
        "answer": settled["answer"],
        "randgreedi_s": seconds,
        "features_activated": int(np.unique(indices).size),
    }


def fit_exponent(by_n: dict[int, float]) -> float:
    ns = sorted(by_n)
    return math.log(by_n[ns[-1]] / by_n[ns[-2]]) / math.log(ns[-1] / ns[-2])


def matmul_params(cfg: RunConfig, layer: int) -> int:
    """Weights the forward pass multiplies by, up to the SAE's layer (embeddings are lookups)."""
    from raysel.core.models import load_model, truncate_to_layer

    model = truncate_to_layer(load_model(cfg.model, "cpu"), layer)
    return sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and p.dim() == 2)


def extrapolate(encode1: dict, by_n: dict[int, float], exponent: float, args) -> dict:
    """10M samples on 8 GPUs, from the measured per-sample costs; the assumptions go into the result."""
    n, gpus = 10_000_000, 8
    tokens = encode1["tokens"] / encode1["samples"]
    cfg = encode1["cfg"]
    params = matmul_params(cfg, encode1["layer"])
    flops = 2 * params * tokens  # forward only, up to the SAE's layer; the SAE adds d_in * d_sae * 2 per token
    cpu_gflops = flops / encode1["compute_s_per_sample"] / 1e9
    gpu_s = n * flops / (args.gpu_tflops * 1e12) / gpus
    biggest = max(by_n)
    select_at = lambda m: by_n[biggest] * (m / biggest) ** exponent  # noqa: E731
    partitions = math.ceil(n / CoverageConfig().distributed_rows)
    return {
        "assumptions": {
            "tokens_per_sample": round(tokens, 1),
            "params_to_sae_layer": params,
            "flops_per_sample": flops,
            "cpu_gflops_measured_per_core": round(cpu_gflops, 2),
            "gpu_effective_tflops": args.gpu_tflops,
            "gpus": gpus,
            "encode_scales_linearly_with_gpus": True,
            "select_budget": "n / 10",
            "select_growth": f"t(n) = t({biggest:,}) * (n / {biggest:,})^{exponent:.2f}",
            "randgreedi_partitions": partitions,
            "io_and_stats": "not modelled (stats streams, O(d_sae * top_n) memory)",
        },
        "encode_hours_8_gpus": gpu_s / 3600,
        "encode_hours_8_cpu_actors_like_here": n * encode1["compute_s_per_sample"] / 8 / 3600,
        "select_single_node_s": select_at(n),
        "select_randgreedi_s": select_at(n / partitions) + select_at(partitions * n / 10),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, default=Path("../shared/data/pool.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("runs/scale_bench"))
    parser.add_argument("--encode-samples", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--gpu-tflops",
        type=float,
        default=100.0,
        help="assumed effective bf16 TFLOP/s of one GPU on this small model (H100 dense peak: ~990)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    print(f"encode: {args.encode_samples} samples of {args.pool}, default model and SAE, actors of 1 CPU", flush=True)
    encode = {a: encode_run(args.out, args.pool, args.encode_samples, a) for a in (1, 2)}
    for a, e in encode.items():
        print(
            f"  {a} actor(s): {e['samples_per_s']:.2f} samples/s over the stage ({e['seconds']:.1f} s, actors' "
            f"start included); {e['compute_s_per_sample'] * 1000:.0f} ms of actor compute per sample",
            flush=True,
        )
    speedup = encode[2]["samples_per_s"] / encode[1]["samples_per_s"]
    print(f"  2 actors vs 1: {speedup:.2f}x", flush=True)

    print("select: `coverage` on one node, budget n / 10", flush=True)
    by_n = {}
    for n in args.sizes:
        by_n[n] = time_select(n)
        print(f"  n = {n:>9,}: {by_n[n]:7.2f} s", flush=True)
    exponent = fit_exponent(by_n)
    print(f"  growth between the two largest: t ~ n^{exponent:.2f}", flush=True)

    print("RandGreeDi against the single-node greedy (objective: features covered)", flush=True)
    synthetic = write_store(args.out / "synthetic_store", *zipf_rows(100_000))
    cases = [ratio(synthetic, 0.0, b, 4) for b in (100, 1000)]
    real = encode[1]["storage"]
    tau = FeatureStore(real).resolve_tau(0.0, encode[1]["cfg"].activation.target_active)
    cases += [ratio(real, tau, b, 2) for b in (8, 16)]
    for c in cases:
        print(
            f"  n = {c['n']:,} ({c['features_activated']:,} features), budget {c['budget']:,}, {c['partitions']} "
            f"partitions: {c['randgreedi']:.0f} vs {c['single']:.0f} features, ratio {c['ratio']:.4f} "
            f"({c['answer']}; {c['randgreedi_s']:.1f} s)",
            flush=True,
        )

    plan = extrapolate(encode[1], by_n, exponent, args)
    print("10M samples on 8 GPUs, extrapolated:")
    for k, v in plan["assumptions"].items():
        print(f"  assume {k}: {v}")
    print(
        f"  encode: {plan['encode_hours_8_gpus']:.2f} h on 8 GPUs, the compute-bound floor "
        f"({plan['encode_hours_8_cpu_actors_like_here']:.0f} h on 8 CPU actors like this machine's)"
    )
    print(
        f"  select: {plan['select_single_node_s']:.0f} s on one node; RandGreeDi "
        f"{plan['select_randgreedi_s']:.0f} s (partitions in parallel, then the merge)",
        flush=True,
    )
    print(
        json.dumps(
            {
                "actors_2_vs_1_speedup": round(speedup, 3),
                "encode_samples_per_s": {a: round(e["samples_per_s"], 3) for a, e in encode.items()},
                "randgreedi_objective_ratio": round(min(c["ratio"] for c in cases), 4),
                "randgreedi_cases": [{k: c[k] for k in ("n", "budget", "partitions", "ratio")} for c in cases],
                "select_seconds_by_n": {n: round(s, 3) for n, s in by_n.items()},
                "select_growth_exponent": round(exponent, 3),
                "extrapolation_10m_8_gpus": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in plan.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
