"""FAC, feature activation coverage: how much of a task's feature set a dataset reaches.

F is the set of task-relevant features: a user's list, or the features most
enriched on an anchor set P over the evaluated set Q (share of samples
activating them, as IGDS's frequency recall). With A(x) = {j : g_j(x) > tau}:

    F(P) = {j in F : some anchor sample activates j}
    F(Q) = {j in F(P) : some sample of Q activates j}
    FAC(Q) = |F(Q)| / |F(P)|,   missing = F(P) minus F(Q)

and two weighted variants over F(P): by the share of anchor samples activating
j (frequency) and by the anchor's max activation of j (magnitude).

FAC-guided selection covers the missing features from a pool: each pick is the
sample activating the most still-uncovered missing features, ties to the one
whose activations of them sum highest, then the smaller id. Once no pick adds a
feature, coverage starts over, as in SAE-GreedSelect.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysel.igds import frequency_recall


def activation_profile(table: pa.Table, tau: float, d_sae: int) -> tuple[np.ndarray, np.ndarray]:
    """Per feature: the share of the table's samples activating it, and its max activation."""
    values = pc.list_flatten(table["feat_max"]).to_numpy().astype(np.float64)
    feats = pc.list_flatten(table["feat_ids"]).to_numpy().astype(np.int64)
    active = values > tau
    share = np.bincount(feats[active], minlength=d_sae) / max(table.num_rows, 1)
    peak = np.zeros(d_sae)
    np.maximum.at(peak, feats, values)
    return share, peak


def task_features(anchor: pa.Table, evaluated: pa.Table, tau: float, d_sae: int, listed: list[int],
                  n: int) -> np.ndarray:
    """F: the listed features, or the n most enriched on the anchor over the evaluated set."""
    if listed:
        return np.array(sorted(set(listed)), dtype=np.int64)
    q_share, _ = activation_profile(evaluated, tau, d_sae)
    enriched = frequency_recall(anchor, tau, q_share * max(evaluated.num_rows, 1), evaluated.num_rows, n)
    return np.sort(enriched.filter(pc.greater(enriched["lift"], 0))["feature"].to_numpy())


def fac(anchor: pa.Table, evaluated: pa.Table, features: np.ndarray, tau: float, d_sae: int) -> tuple[dict, pa.Table]:
    """The FAC figures, and one row per feature of F with what they rest on."""
    a_share, a_max = activation_profile(anchor, tau, d_sae)
    q_share, q_max = activation_profile(evaluated, tau, d_sae)
    in_p = a_share[features] > 0
    in_q = in_p & (q_share[features] > 0)
    fp, fq = features[in_p], features[in_q]

    def weighted(w: np.ndarray) -> float:
        total = w[fp].sum()
        return float(w[fq].sum() / total) if total > 0 else 0.0

    summary = {"n_features": int(features.size), "n_in_anchor": int(fp.size), "n_covered": int(fq.size),
               "fac": fq.size / fp.size if fp.size else 0.0, "fac_frequency": weighted(a_share),
               "fac_magnitude": weighted(a_max), "missing": sorted(set(fp.tolist()) - set(fq.tolist()))}
    table = pa.table({"feature": features, "anchor_share": a_share[features], "anchor_max": a_max[features],
                      "evaluated_share": q_share[features], "evaluated_max": q_max[features],
                      "in_anchor": in_p, "covered": in_q, "missing": in_p & ~in_q})
    return summary, table


def fac_greedy(table: pa.Table, missing: np.ndarray, tau: float, k: int) -> tuple[list[str], list[int]]:
    """FAC-guided selection of k samples of `table`: ids in pick order, and the missing features each adds.
    Only samples activating a missing feature compete (each step costs their entries, not the pool);
    if the budget outlasts them, the rest follow in id order, adding nothing."""
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    rows = pc.list_parent_indices(table["feat_ids"]).to_numpy()
    feats = pc.list_flatten(table["feat_ids"]).to_numpy().astype(np.int64)
    values = pc.list_flatten(table["feat_max"]).to_numpy().astype(np.float64)
    hit = np.isin(feats, missing) & (values > tau)
    candidates, local = np.unique(rows[hit], return_inverse=True)
    column, values = np.searchsorted(missing, feats[hit]), values[hit]
    tie = np.argsort(np.argsort(ids[candidates].astype(str)))  # smaller id first on full ties
    covered, chosen = np.zeros(missing.size, bool), np.zeros(candidates.size, bool)
    order, added = [], []
    while len(order) < k and not chosen.all():
        fresh = ~covered[column] & ~chosen[local]
        count = np.bincount(local[fresh], minlength=candidates.size)
        if count.max() == 0 and covered.any():
            covered[:] = False  # every coverable missing feature is covered: start over
            continue
        strength = np.bincount(local[fresh], values[fresh], minlength=candidates.size)
        best = np.lexsort((tie, -strength, -count, chosen))[0]
        order.append(ids[candidates[best]])
        added.append(int(count[best]))
        chosen[best] = True
        covered[column[local == best]] = True
    rest = sorted(set(ids.tolist()) - set(order))[: max(0, k - len(order))]
    return order + rest, added + [0] * len(rest)
