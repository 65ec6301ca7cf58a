"""FAC, feature activation coverage: how much of a task's feature set a dataset reaches.

F is the set of task-relevant features: a user's list, or the features most enriched on an anchor
set P over a fixed reference set R (share of samples activating them, as IGDS's frequency recall),
never over the set being measured: F must not change with Q, or the FAC of two datasets could not be
compared. R is fac.reference, by default the bundled P3 mix (1,930 prompted NLP tasks from 294 templates,
disjoint from the demo corpus and the benchmarks' data; data/SOURCES.md). With
A(x) = {j : g_j(x) > tau}:

    F(P) = {j in F : some anchor sample activates j}
    F(Q) = {j in F(P) : some sample of Q activates j}
    FAC(Q) = |F(Q)| / |F(P)|,   missing = F(P) minus F(Q)

and weighted variants over F(P): by the share of anchor samples activating j (frequency), and by
the anchor's activation of j (magnitude): its mean over the anchor samples that activate j (the
paper's reading, `fac_magnitude`) or its max (`fac_magnitude_max`).

One threshold serves all of it: fac.tau, or the tau calibrated once on the reference to
fac.target_active activated features a sample, stored with F by the task_features stage. Never the
run's own (activation.*), which is calibrated on the run's input: the measured set.

FACConfig, the top-level `fac` section, defines F and the anchor for `raysel fac`, `raysel synthesize`
and method `fac` alike. The task_features stage computes F once per (anchor, reference, model, SAE).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from raysel.core.features import Profile, frequency_recall
from raysel.core.section import Section


class FACConfig(Section):
    """The task features F and the anchor they come from (the top-level `fac` section). `raysel fac`
    measures the run's input against the anchor; method `fac` selects from the input (the pool) the
    samples that cover what its `evaluated` set (if any) is missing."""

    anchor: list[str] = []
    """anchor (task) examples for `raysel fac`, `raysel synthesize` and the `fac` method, encoded into
    `<output.root>/anchor/`"""
    tau: float | None = Field(None, ge=0)
    """FAC's activation threshold, one for F, F(P), F(Q), FAC-select and synthesis's δ, whatever `activation.*` says
    (the run's τ is calibrated on the run's input: the measured set); `null`: calibrated once on the reference to
    `fac.target_active`. Stored with F in `stages/task_features.json`; `raysel fac` logs it and where it came from,
    and `fac/report.json` holds both"""
    target_active: float = Field(32, gt=0)
    """with `fac.tau` unset: τ such that the reference's samples have this many activated features on average"""
    reference: list[str] = []
    """the generic instruction mix F is enriched against, encoded into `<output.root>/reference/`; empty: the bundled
    reference, 1,930 rows of P3 (T0's prompted mixture of 38 English NLP datasets, 294 templates, 7 rows each;
    Apache-2.0 as self-instruct ships it; disjoint from the demo corpus and `../shared/data`;
    `raysel/data/SOURCES.md`). Its encode, once per output root, took 261 s on 2 CPU cores (`benchmarks/fac.py`,
    2026-12-07; prompts cut at 256 tokens). F never depends on the dataset being measured, so the FACs of two
    datasets compare; nor does its threshold (`fac.tau`)"""
    features: list[int] = []
    """the task-relevant features F; empty: the `fac.n_features` most enriched on the anchor over `fac.reference` (share
    activating, anchor − reference). F is computed once per anchor, reference, model, SAE and FAC threshold by the
    task_features stage (`stages/task_features.json` holds it, keyed by the two sets' encode fingerprints) and shared
    by `raysel fac`, `raysel synthesize` and method `fac`"""
    n_features: int = Field(100, gt=0)
    """size of the enriched F, or of the shortlist the judge rates"""
    judge_task: str | None = None
    """a sentence naming the task: F is then what an LLM judge keeps of the enriched shortlist. For each feature it
    explains the top spans, verifies its label, and rates relevance (Yes, Probably, Maybe, No); verdicts in
    `fac/judged.parquet`. A feature the generator writes no description for (or that has no spans) is judged No, with
    the `reason`"""
    judge_generator: str | None = (
        None  # the judge: any causal LM (local dir, HF id, embedded default); None: model.name
    )
    """the judge: any causal LM (a local directory, an HF id, or the embedded default); `null`: `model.name`"""
    judge_keep: Literal["yes", "probably", "maybe"] = "maybe"
    """the weakest relevance kept, `yes`, `probably` or `maybe` (the paper keeps Maybe or better)"""

    @model_validator(mode="after")
    def _one_source(self):
        if self.features and self.judge_task:
            raise ValueError("fac: set fac.features (a list) or fac.judge_task (an LLM judge), not both")
        return self


def threshold_source(cfg: FACConfig) -> str:
    if cfg.tau is not None:
        return "fac.tau"
    return f"calibrated on the reference to {cfg.target_active:g} activated features a sample"


def feature_source(cfg: FACConfig) -> str:
    if cfg.features:
        return "list"
    against = "fac.reference" if cfg.reference else "the bundled P3 reference"
    shortlist = f"the {cfg.n_features} most enriched on the anchor over {against}"
    return f"{shortlist}, judged by an LLM ({cfg.judge_keep} or better)" if cfg.judge_task else shortlist


def enriched_features(anchor: pa.Table, reference: pa.Table, tau: float, d_sae: int, n: int) -> np.ndarray:
    """The n features most enriched on the anchor over the reference (positive lift only), by id."""
    r_counts = Profile.of(reference, tau, d_sae).counts
    return np.sort(frequency_recall(anchor, tau, r_counts, reference.num_rows, n)["feature"].to_numpy())


def fac(anchor: Profile, evaluated: Profile, features: np.ndarray) -> tuple[dict, pa.Table]:
    """The FAC figures, and one row per feature of F with what they rest on."""
    a_share, a_max, q_share, q_max = anchor.share, anchor.peak, evaluated.share, evaluated.peak
    a_mean = anchor.mean
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
        "fac_magnitude": weighted(a_mean),
        "fac_magnitude_max": weighted(a_max),
        "missing": sorted(set(fp.tolist()) - set(fq.tolist())),
    }
    table = pa.table(
        {
            "feature": features,
            "anchor_share": a_share[features],
            "anchor_mean": a_mean[features],
            "anchor_max": a_max[features],
            "evaluated_share": q_share[features],
            "evaluated_max": q_max[features],
            "in_anchor": in_p,
            "covered": in_q,
            "missing": in_p & ~in_q,
        }
    )
    return summary, table
