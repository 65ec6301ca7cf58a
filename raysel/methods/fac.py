"""FAC-guided selection (method `fac`): cover, from the pool, the anchor's task features (F, from the
task_features stage) that the `evaluated` set (or nothing) misses. Each pick is the sample activating
the most still-uncovered missing features, ties to the one whose activations of them sum highest,
then by the ids' seeded hash. Once no pick adds a feature, coverage starts over, as in SAE-GreedSelect. The
FAC figures themselves are raysel.core.fac's.
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysel.core.fac import FACConfig, fac
from raysel.core.features import Profile, activated_entries, is_active, seeded_hash
from raysel.methods.base import Context, Method, MethodConfig, Picks, Pool

log = logging.getLogger(__name__)


class FACSelectConfig(MethodConfig):
    """The pool samples that cover the anchor's task features `evaluated` misses, strongest first; the manifest has FAC
    before and after, and for random picks"""

    name: Literal["fac"] = "fac"
    evaluated: list[str] = []
    """the dataset you already have (files, globs, `s3://`; empty: start from nothing); F and the anchor come from the
    `fac` section"""


class FACSelect(Method):
    """`method: fac`: pool samples covering the anchor features that `evaluated` (or nothing) misses."""

    Config = FACSelectConfig
    needs = ("task_features",)

    def side_inputs(self, fac: FACConfig) -> dict[str, list[str]]:
        # F (and so an edited reference) reaches the select stage's key through the task_features record
        return {"anchor": fac.anchor, "evaluated": self.cfg.evaluated}

    def pick(self, pool: Pool, k: int, ctx: Context) -> Picks:
        """The pool is read as blocks on the cluster: its activated sets (in `pool`), and the entries
        of the missing features alone, so the driver never holds the store."""
        tau = ctx.fac_tau  # FAC's, stored with F: never the run's, calibrated on this pool
        anchor = ctx.side_set("anchor", ctx.fac.anchor).profile(tau, ctx.d_sae)
        have = Profile.empty(ctx.d_sae)
        if self.cfg.evaluated:
            have = ctx.side_set("evaluated", self.cfg.evaluated).profile(tau, ctx.d_sae)
        features = ctx.task_features
        before, _ = fac(anchor, have, features)
        missing = np.array(before["missing"], dtype=np.int64)
        find = functools.partial(restricted, features=missing, tau=tau)
        hits = list(pool.store.blocks(find, HIT_COLUMNS, name="fac: hits"))
        hits = pa.concat_tables(hits) if hits else pa.table({c: [] for c in HIT_COLUMNS})
        rest = np.random.default_rng(ctx.seed).permutation(pool.ids)  # a budget the hits cannot fill: seeded
        order, added = fac_greedy(hits, missing, tau, k, ctx.seed, rest)
        if filled := sum(a == 0 for a in added):
            log.info("fac: %d of %d picks add no missing feature (seeded random pool samples)", filled, len(order))
        hit_ids, hit_rows = (
            np.asarray(hits["id"].to_pylist(), object),
            pc.list_parent_indices(hits["feat_ids"]).to_numpy(),
        )
        hit_feats = pc.list_flatten(hits["feat_ids"]).to_numpy().astype(np.int64)

        def fac_with(ids) -> float:
            """FAC of what `evaluated` has plus the pool samples `ids`: their hits are all they add."""
            mine = np.isin(hit_ids, np.asarray(ids, object))[hit_rows]
            picked = np.bincount(hit_feats[mine], minlength=ctx.d_sae)
            empty = np.zeros(ctx.d_sae)
            return fac(anchor, have.merge(Profile(picked, empty, len(ids), empty)), features)[0]["fac"]

        random_ids = rest[:k]  # the same seeded shuffle
        settled = {
            "fac_features": int(features.size),
            "fac_in_anchor": before["n_in_anchor"],
            "fac_missing_before": len(before["missing"]),
            "fac_before": before["fac"],
            "fac_after": fac_with(order),
            "fac_random_after": fac_with(random_ids),
            "fac_pool": fac_with(hit_ids),
        }
        log.info(
            "fac: FAC %.3f before, %.3f after %d picks (random picks: %.3f; the whole pool: %.3f)",
            settled["fac_before"],
            settled["fac_after"],
            len(order),
            settled["fac_random_after"],
            settled["fac_pool"],
        )
        return Picks(order, np.asarray(added, np.float64), settled)


HIT_COLUMNS = ["id", "feat_ids", "feat_max"]


def restricted(table: pa.Table, features: np.ndarray, tau: float) -> pa.Table:
    """The block's samples that activate any of `features`, holding those entries alone."""
    rows, feats, values = activated_entries(table, tau)
    keep = np.isin(feats, features)
    rows, feats, values = rows[keep], feats[keep], values[keep]
    hit, counts = np.unique(rows, return_counts=True)
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int32)
    return pa.table({
        "id": table["id"].take(hit),
        "feat_ids": pa.ListArray.from_arrays(offsets, feats.astype(np.int32)),
        "feat_max": pa.ListArray.from_arrays(offsets, values.astype(np.float32)),
    })  # fmt: skip


def fac_greedy(
    table: pa.Table, missing: np.ndarray, tau: float, k: int, seed: int, pool_ids: np.ndarray | None = None
) -> tuple[list[str], list[int]]:
    """FAC-guided selection of k samples of `table`: ids in pick order, and the missing features each adds.
    Only samples activating a missing feature compete (each step costs their entries, not the pool);
    if the budget outlasts them, the rest of `pool_ids` (in the order given; default: the table's ids
    sorted) follow, adding nothing."""
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    rows = pc.list_parent_indices(table["feat_ids"]).to_numpy()
    feats = pc.list_flatten(table["feat_ids"]).to_numpy().astype(np.int64)
    values = pc.list_flatten(table["feat_max"]).to_numpy().astype(np.float64)
    hit = np.isin(feats, missing) & is_active(values, tau)
    candidates, local = np.unique(rows[hit], return_inverse=True)
    column, values = np.searchsorted(missing, feats[hit]), values[hit]
    tie = seeded_hash(ids[candidates], seed)  # on full ties, never the id order
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
    everyone, taken = sorted(ids.tolist()) if pool_ids is None else pool_ids.tolist(), set(order)
    rest = list(itertools.islice((i for i in everyone if i not in taken), max(0, k - len(order))))
    return order + rest, added + [0] * len(rest)
