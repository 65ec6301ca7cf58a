"""raysel's selection against stock apricot, side by side in one run.

Synthetic activated sets: every row draws 2 * nnz features from a Zipf(1)
popularity over d features (ids shuffled, so popularity is not id order) and
keeps its first nnz distinct ones. Each measurement runs in a fresh child
process, so its peak RSS is its own and a run over its cap can be killed.

- apricot: `MaxCoverageSelection(budget, optimizer='lazy')` on the CSR matrix, warm as
  raysel is: a fit on 100 rows first, so its numba code is compiled before the clock starts;
  timed to its cap; a run that does not finish counts at the cap. Its curve is
  compared with raysel's wherever it finishes (always at n = 10k, the size the
  exactness check uses).
- raysel `coverage` (raysel.methods.coverage_kernel.greedy_coverage), warm: the numba code is
  compiled in the child before the clock starts. The method itself runs it through
  seeded_coverage, which first puts the rows in the order of their ids' seeded hash (so that ties
  do not follow the ids' spelling): 0.8 s more at 1M rows of 64 entries (2.3 s against 1.5 s at a
  budget of 1,000), not counted here, since the synthetic rows have no ids.
- checks: equal to a naive exact greedy (scipy, every row scored every step) at
  n = 10k; coverage at every curve checkpoint >= apricot's; no duplicate
  picks; every reset happens exactly when no remaining row has positive gain.
- 1M rows, budget 100k: `coverage` time and peak RSS; `simscale` time (capped).

    python benchmarks/select.py            # about 25 minutes (apricot alone takes up to 10)
    python benchmarks/select.py --quick    # under two minutes, smaller sizes (see the `sizes` key)

The last line printed is one JSON object.
"""

from __future__ import annotations

import os
import sys

# This file is named like the stdlib's `select`: drop its folder from the path before anything imports that.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

D, NNZ = 16384, 64


def zipf_rows(n: int, d: int = D, nnz: int = NNZ, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, d + 1)
    perm = rng.permutation(d)
    rows = np.sort(rng.choice(d, size=(n, 2 * nnz), p=p / p.sum()).astype(np.int32), axis=1)
    repeat = np.zeros(rows.shape, bool)
    repeat[:, 1:] = rows[:, 1:] == rows[:, :-1]
    rows = np.sort(np.where(repeat, d, rows), axis=1)[:, :nnz]  # distinct ones first, then d as filler
    real = rows < d
    indptr = np.r_[0, np.cumsum(real.sum(1))].astype(np.int64)
    return indptr, perm[rows[real]].astype(np.int32)


def matrix(indptr, indices) -> sp.csr_matrix:
    return sp.csr_matrix((np.ones(indices.size, np.float32), indices, indptr), shape=(len(indptr) - 1, D))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def run_raysel(n: int, budget: int) -> dict:
    from raysel.methods.coverage_kernel import greedy_coverage

    indptr, indices = zipf_rows(n)
    greedy_coverage(indptr[:101], indices[: indptr[100]], 10)  # compile (or load numba's cache) off the clock
    start = time.perf_counter()
    sel = greedy_coverage(indptr, indices, budget)
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_gb": peak_rss_gb(),
        "order": sel.order,
        "resets": sel.resets,
        "gains": sel.gains,
    }


def run_apricot(n: int, budget: int) -> dict:
    from apricot import MaxCoverageSelection

    x = matrix(*zipf_rows(n))
    MaxCoverageSelection(10, optimizer="lazy", verbose=False).fit(x[:100])  # numba compiles, as raysel's warm-up
    start = time.perf_counter()
    ranking = MaxCoverageSelection(budget, optimizer="lazy", verbose=False).fit(x).ranking
    return {"seconds": time.perf_counter() - start, "order": np.asarray(ranking)}


def run_simscale(n: int, budget: int) -> dict:
    from raysel.methods.simscale_kernel import simscale

    indptr, indices = zipf_rows(n)
    simscale(indptr[:101], indices[: indptr[100]], 10)
    start = time.perf_counter()
    kept = simscale(indptr, indices, budget)
    return {
        "seconds": time.perf_counter() - start,
        "kept": len(kept.order),
        "theta": kept.theta,
        "passes": kept.passes,
        "peak_rss_gb": peak_rss_gb(),
    }


def in_child(fn, *args, cap: float | None = None) -> dict | None:
    """fn(*args) in a fresh process; None if it runs past `cap` seconds (the child is killed)."""
    with mp.get_context("spawn").Pool(1) as pool:
        try:
            return pool.apply_async(fn, args).get(cap)
        except mp.TimeoutError:
            return None


def naive_greedy(indptr, indices, budget: int) -> list[int]:
    """Greedy max coverage with the saturation reset, every row scored at every step."""
    x, sizes = matrix(indptr, indices), np.diff(indptr)
    covered, left, order = np.zeros(D, bool), np.ones(len(sizes), bool), []
    while len(order) < budget:
        gain = np.where(left, x @ (~covered).astype(np.float32), -1.0)
        if gain.max() == 0 and covered.any():
            covered[:] = False
            continue
        best = int(np.argmax(np.where(gain == gain.max(), sizes, -1)))  # then the larger set, then the earlier row
        order.append(best)
        covered[indices[indptr[best] : indptr[best + 1]]] = True
        left[best] = False
    return order


def curve(order, indptr, indices, checkpoints: np.ndarray) -> np.ndarray:
    """Distinct features covered by the first k picks, at each checkpoint k."""
    first = np.full(D, np.iinfo(np.int64).max)
    lengths = np.diff(indptr)[order]
    feats = np.concatenate([indices[indptr[r] : indptr[r + 1]] for r in order])
    np.minimum.at(first, feats, np.repeat(np.arange(len(order)), lengths))
    return np.searchsorted(np.sort(first), checkpoints, side="left")


def resets_exact(sel: dict, indptr, indices) -> bool:
    """Every pick before a reset gained something, and at each reset no remaining row could."""
    x, order, gains = matrix(indptr, indices), sel["order"], sel["gains"]
    if np.any(gains <= 0):
        return False
    bounds = [0, *sel["resets"]]
    for start, stop in zip(bounds, bounds[1:]):
        covered = np.zeros(D, bool)
        covered[np.concatenate([indices[indptr[r] : indptr[r + 1]] for r in order[start:stop]])] = True
        left = np.ones(x.shape[0], bool)
        left[order[:stop]] = False
        if (x[left] @ (~covered).astype(np.float32)).max() > 0:
            return False
    return True


def compare(n: int, budget: int, cap: float) -> dict:
    print(f"n = {n:,}, budget {budget:,}: apricot (lazy, capped at {cap:.0f} s) and raysel `coverage`", flush=True)
    ours = in_child(run_raysel, n, budget)
    theirs = in_child(run_apricot, n, budget, cap=cap)
    indptr, indices = zipf_rows(n)
    row = {
        "n": n,
        "budget": budget,
        "raysel_s": ours["seconds"],
        "apricot_finished": theirs is not None,
        "apricot_s": theirs["seconds"] if theirs else cap,
        "raysel_duplicates": len(ours["order"]) - len(set(ours["order"])),
        "resets": len(ours["resets"]),
        "resets_exact": resets_exact(ours, indptr, indices),
    }
    row["speedup"] = row["apricot_s"] / row["raysel_s"]
    if theirs:
        points = np.linspace(budget / 20, budget, 20).astype(int)
        ours_c, theirs_c = (
            curve(ours["order"], indptr, indices, points),
            curve(theirs["order"], indptr, indices, points),
        )
        row |= {
            "apricot_duplicates": len(theirs["order"]) - len(set(theirs["order"].tolist())),
            "checkpoints_at_least_apricot": int((ours_c >= theirs_c).sum()),
            "checkpoints": len(points),
            "coverage_at_budget": {"raysel": int(ours_c[-1]), "apricot": int(theirs_c[-1])},
        }
    if n <= 10_000:
        row["equals_naive_greedy"] = ours["order"].tolist() == naive_greedy(indptr, indices, budget)
    print("  " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under two minutes")
    parser.add_argument("--apricot-cap", type=float, default=600.0)
    parser.add_argument("--simscale-cap", type=float, default=900.0)
    args = parser.parse_args()
    sizes = (
        {"apricot_n": 10_000, "coverage_big_n": 100_000, "simscale_n": 20_000}
        if args.quick
        else {"apricot_n": 100_000, "coverage_big_n": 1_000_000, "simscale_n": 1_000_000}
    )

    big = sizes["coverage_big_n"]
    print(f"n = {big:,}, budget {big // 10:,}: raysel `coverage`", flush=True)
    cov = in_child(run_raysel, big, big // 10)
    print(f"  {cov['seconds']:.1f} s, peak RSS {cov['peak_rss_gb']:.2f} GB, {len(cov['resets'])} resets", flush=True)
    rows = [compare(10_000, 1_000, args.apricot_cap)]
    if sizes["apricot_n"] != 10_000:
        rows.append(compare(sizes["apricot_n"], sizes["apricot_n"] // 10, args.apricot_cap))
    print(
        f"n = {sizes['simscale_n']:,}, budget 10 %: raysel `simscale` (capped at {args.simscale_cap:.0f} s)", flush=True
    )
    sim = in_child(run_simscale, sizes["simscale_n"], sizes["simscale_n"] // 10, cap=args.simscale_cap)
    print(
        f"  {sim['seconds']:.1f} s, kept {sim['kept']:,}, theta {sim['theta']:.3f}, {sim['passes']} passes"
        if sim
        else "  did not finish within the cap",
        flush=True,
    )

    compared = [r for r in rows if r["apricot_finished"]]
    print(
        json.dumps(
            {
                "speedup_vs_apricot": round(rows[-1]["speedup"], 1),
                "apricot_finished": rows[-1]["apricot_finished"],
                "objective_at_least_apricot": all(
                    r["checkpoints_at_least_apricot"] == r["checkpoints"] for r in compared
                ),
                "objective_compared_at_n": [r["n"] for r in compared],
                "no_duplicate_picks": all(r["raysel_duplicates"] == 0 for r in rows),
                "apricot_duplicate_picks": {r["n"]: r["apricot_duplicates"] for r in compared},
                "resets_exact": all(r["resets_exact"] for r in rows),
                "equals_naive_greedy_10k": rows[0]["equals_naive_greedy"],
                "coverage_1m_s": round(cov["seconds"], 2),
                "coverage_1m_peak_rss_gb": round(cov["peak_rss_gb"], 2),
                "simscale_1m_s": round(sim["seconds"], 1) if sim else None,
                "simscale_cap_s": args.simscale_cap,
                "sizes": sizes,
            }
        )
    )


if __name__ == "__main__":
    main()
