"""FAC, feature activation coverage: how much of a task's feature set a dataset reaches.

F is the set of task-relevant features: a user's list, or the features most
enriched on an anchor set P over a fixed reference set R (share of samples
activating them, as IGDS's frequency recall), never over the set being measured:
F must not change with Q, or the FAC of two datasets could not be compared.
R is fac.reference, by default the bundled demo corpus (a generic instruction mix).
With A(x) = {j : g_j(x) > tau}:

    F(P) = {j in F : some anchor sample activates j}
    F(Q) = {j in F(P) : some sample of Q activates j}
    FAC(Q) = |F(Q)| / |F(P)|,   missing = F(P) minus F(Q)

and two weighted variants over F(P): by the share of anchor samples activating
j (frequency) and by the anchor's max activation of j (magnitude).

FAC-guided selection (method `fac`) covers the missing features from a pool: each
pick is the sample activating the most still-uncovered missing features, ties to
the one whose activations of them sum highest, then the smaller id. Once no pick
adds a feature, coverage starts over, as in SAE-GreedSelect.

FACConfig, the top-level `fac` section, defines F and the anchor for `raysel fac`,
`raysel synthesize` and method `fac` alike; a method entry adds only what it selects against.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from raysel.core import paths
from raysel.core.features import FeatureStore, Profile, activated_entries, is_active
from raysel.core.section import Section
from raysel.methods.base import Context, Method, MethodConfig, Picks, Pool
from raysel.methods.igds import frequency_recall

if TYPE_CHECKING:
    from raysel.config import ModelStack
    from raysel.core.storage import Storage

log = logging.getLogger(__name__)


class FACConfig(Section):
    """The task features F and the anchor they come from (the top-level `fac` section). `raysel fac`
    measures the run's input against the anchor; method `fac` selects from the input (the pool) the
    samples that cover what its `evaluated` set (if any) is missing."""

    anchor: list[str] = []  # files, globs or s3:// paths of the anchor (task) examples
    reference: list[str] = []  # the generic mix F is enriched against; empty: the bundled demo corpus
    features: list[int] = []  # task-relevant features F; empty: the n_features most enriched on the anchor
    n_features: int = Field(100, gt=0)  # size of the enriched F, or of the shortlist the judge rates
    judge_task: str | None = None  # set: F is what an LLM judge rates relevant to this task, of the shortlist
    judge_generator: str | None = (
        None  # the judge: any causal LM (local dir, HF id, embedded default); None: model.name
    )
    judge_keep: Literal["yes", "probably", "maybe"] = "maybe"  # the weakest relevance verdict kept

    @model_validator(mode="after")
    def _one_source(self):
        if self.features and self.judge_task:
            raise ValueError("fac: set fac.features (a list) or fac.judge_task (an LLM judge), not both")
        return self


class FACSelectConfig(MethodConfig):
    name: Literal["fac"] = "fac"
    evaluated: list[str] = []  # the dataset you already have (empty: start from nothing)


class FACSelect(Method):
    """`method: fac`: pool samples covering the anchor features that `evaluated` (or nothing) misses."""

    Config = FACSelectConfig

    def side_inputs(self, ctx: Context) -> dict[str, list[str]]:
        # the reference too: an edited reference changes F, and so the picks
        return {"anchor": ctx.fac.anchor, "reference": ctx.fac.reference or [paths.demo_data()],
                "evaluated": self.cfg.evaluated}  # fmt: skip

    def pick(self, pool: Pool, k: int, ctx: Context) -> Picks:
        """The pool is read as blocks on the cluster: its activated sets (in `pool`), and the entries
        of the missing features alone, so the driver never holds the store."""
        anchor = ctx.side_set("anchor", ctx.fac.anchor).profile(ctx.tau, ctx.d_sae)
        have = Profile.empty(ctx.d_sae)
        if self.cfg.evaluated:
            have = ctx.side_set("evaluated", self.cfg.evaluated).profile(ctx.tau, ctx.d_sae)
        features = task_feature_set(ctx)
        before, _ = fac(anchor, have, features)
        missing = np.array(before["missing"], dtype=np.int64)
        find = functools.partial(restricted, features=missing, tau=ctx.tau)
        hits = list(pool.store.blocks(find, HIT_COLUMNS, name="fac: hits"))
        hits = pa.concat_tables(hits) if hits else pa.table({c: [] for c in HIT_COLUMNS})
        order, added = fac_greedy(hits, missing, ctx.tau, k, pool.ids)

        def fac_with(rows: np.ndarray) -> float:
            picked = np.bincount(pool.features_of(rows), minlength=ctx.d_sae)
            return fac(anchor, have.merge(Profile(picked, np.zeros(ctx.d_sae), len(rows))), features)[0]["fac"]

        random_rows = np.random.default_rng(ctx.seed).permutation(len(pool.ids))[:k]
        settled = {
            "fac_features": int(features.size),
            "fac_in_anchor": before["n_in_anchor"],
            "fac_missing_before": len(before["missing"]),
            "fac_before": before["fac"],
            "fac_after": fac_with(pool.rows_of(order)),
            "fac_random_after": fac_with(random_rows),
            "fac_pool": fac_with(np.arange(len(pool.ids))),
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


def feature_source(cfg: FACConfig) -> str:
    if cfg.features:
        return "list"
    against = "fac.reference" if cfg.reference else "the bundled demo corpus"
    shortlist = f"the {cfg.n_features} most enriched on the anchor over {against}"
    return f"{shortlist}, judged by an LLM ({cfg.judge_keep} or better)" if cfg.judge_task else shortlist


def anchor_spans(stack: ModelStack, top_n: int, anchor: FeatureStore, features: list[int]) -> pa.Table:
    from raysel.stages.spans import find_spans  # a stage's helper; imported late, stages import the methods

    return find_spans(stack, top_n, anchor.storage, features)


def task_feature_set(ctx: Context) -> np.ndarray:
    """F: fac.features, or enriched on the anchor over the reference (and judged, with fac.judge_task).
    Computed once per (anchor, reference, model, SAE) and reused by `raysel fac`, `raysel synthesize`
    and method `fac`: its marker's key holds the two sets' encode keys, which cover their content,
    the model, the SAE's weights and the dtype."""
    from raysel.stages.base import commit  # the one marker mechanism; stages import the methods

    cfg = ctx.fac
    if cfg.features:
        return np.array(sorted(set(cfg.features)), dtype=np.int64)
    anchor = ctx.side_set("anchor", cfg.anchor)
    reference = ctx.side_set("reference", cfg.reference or [paths.demo_data()])
    key = {
        name: s.storage.read_json(paths.marker("encode"))["key"]
        for name, s in (("anchor", anchor), ("reference", reference))
    }
    key |= {"tau": ctx.tau} | cfg.model_dump(include={"n_features", "judge_task", "judge_generator", "judge_keep"})

    def compute() -> dict:
        features = fac_features(cfg, ctx.stack, ctx.storage, anchor, reference.table(), ctx.tau, ctx.d_sae)
        return {"features": features.tolist(), "source": feature_source(cfg)}

    return np.array(commit(ctx.storage, paths.marker("fac_features"), key, compute)["features"], dtype=np.int64)


def fac_features(
    cfg: FACConfig,
    stack: ModelStack,
    storage: Storage,
    anchor: FeatureStore,
    against: pa.Table,
    tau: float,
    d_sae: int,
) -> np.ndarray:
    """The fac.n_features most enriched on the anchor over `against`; with fac.judge_task, those of
    them an LLM judge finds relevant (fac/judged.parquet holds every verdict)."""
    from raysel.methods.fac_judge import judge_features, kept

    features = enriched_features(anchor.table(), against, tau, d_sae, cfg.n_features)
    if not cfg.judge_task:
        return features
    start = time.time()
    top_n = anchor.storage.read_json(paths.marker("stats"))["top_n"]
    verdicts = judge_features(stack, cfg, anchor_spans(stack, top_n, anchor, features.tolist()), features.tolist())
    storage.fs.create_dir(storage.path(paths.FAC), recursive=True)
    pq.write_table(verdicts, storage.path(paths.FAC, "judged.parquet"), filesystem=storage.fs)
    chosen = kept(verdicts, cfg.judge_keep)
    if not chosen:
        log.warning(
            "fac: the judge kept none of the %d features, so F is empty and FAC means nothing; see its "
            "verdicts in fac/judged.parquet, and try a stronger fac.judge_generator or fac.judge_keep: maybe",
            len(features),
        )
    log.info(
        "fac: the judge kept %d of %d enriched features as relevant to %r (%s or better) in %.0fs",
        len(chosen),
        len(features),
        cfg.judge_task,
        cfg.judge_keep,
        time.time() - start,
    )
    return np.array(chosen, dtype=np.int64)


def enriched_features(anchor: pa.Table, reference: pa.Table, tau: float, d_sae: int, n: int) -> np.ndarray:
    """The n features most enriched on the anchor over the reference (positive lift only), by id."""
    r_counts = Profile.of(reference, tau, d_sae).counts
    enriched = frequency_recall(anchor, tau, r_counts, reference.num_rows, n)
    return np.sort(enriched.filter(pc.greater(enriched["lift"], 0))["feature"].to_numpy())


def fac(anchor: Profile, evaluated: Profile, features: np.ndarray) -> tuple[dict, pa.Table]:
    """The FAC figures, and one row per feature of F with what they rest on."""
    a_share, a_max, q_share, q_max = anchor.share, anchor.peak, evaluated.share, evaluated.peak
    in_p = a_share[features] > 0
    in_q = in_p & (q_share[features] > 0)
    fp, fq = features[in_p], features[in_q]

    def weighted(w: np.ndarray) -> float:
        total = w[fp].sum()
        return float(w[fq].sum() / total) if total > 0 else 0.0

    summary = {
        "n_features": int(features.size),
        "n_in_anchor": int(fp.size),
        "n_covered": int(fq.size),
        "fac": fq.size / fp.size if fp.size else 0.0,
        "fac_frequency": weighted(a_share),
        "fac_magnitude": weighted(a_max),
        "missing": sorted(set(fp.tolist()) - set(fq.tolist())),
    }
    table = pa.table(
        {
            "feature": features,
            "anchor_share": a_share[features],
            "anchor_max": a_max[features],
            "evaluated_share": q_share[features],
            "evaluated_max": q_max[features],
            "in_anchor": in_p,
            "covered": in_q,
            "missing": in_p & ~in_q,
        }
    )
    return summary, table


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
    table: pa.Table, missing: np.ndarray, tau: float, k: int, pool_ids: np.ndarray | None = None
) -> tuple[list[str], list[int]]:
    """FAC-guided selection of k samples of `table`: ids in pick order, and the missing features each adds.
    Only samples activating a missing feature compete (each step costs their entries, not the pool);
    if the budget outlasts them, the rest of `pool_ids` (sorted; default: the table's) follow in id
    order, adding nothing."""
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    rows = pc.list_parent_indices(table["feat_ids"]).to_numpy()
    feats = pc.list_flatten(table["feat_ids"]).to_numpy().astype(np.int64)
    values = pc.list_flatten(table["feat_max"]).to_numpy().astype(np.float64)
    hit = np.isin(feats, missing) & is_active(values, tau)
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
    everyone, taken = sorted(ids.tolist()) if pool_ids is None else pool_ids, set(order)
    rest = list(itertools.islice((i for i in everyone if i not in taken), max(0, k - len(order))))
    return order + rest, added + [0] * len(rest)
