"""The synthesis stage (`raysel synthesize`): FAC Synthesis (core/synthesis.py) for the features the
fac stage finds missing, written like a selection under selection/synthesis/ (records carry their
provenance), with every candidate in synthesis/candidates.parquet and FAC before and after."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pyarrow.parquet as pq

from raysel.core import paths
from raysel.core.encoder import ModelStack
from raysel.core.fac import FACConfig, fac
from raysel.core.features import FeatureStore, Profile
from raysel.core.records import FieldMap, Rejected, normalize
from raysel.core.storage import Storage
from raysel.core.synthesis import SynthesisConfig, acceptance, synthesize
from raysel.stages.base import Done, Stage
from raysel.stages.publish import records_of, write_selection

log = logging.getLogger(__name__)


def judged_labels(storage) -> dict[int, str]:
    """The FAC judge's label of each feature it described, when F came from the judge."""
    if not storage.exists(f"{paths.FAC}/judged.parquet"):
        return {}
    verdicts = pq.read_table(
        storage.path(paths.FAC, "judged.parquet"), columns=["feature", "label"], filesystem=storage.fs
    )
    return {j: label for j, label in zip(verdicts["feature"].to_pylist(), verdicts["label"].to_pylist()) if label}


def synthesis_delta(synthesis: SynthesisConfig, tau: float) -> float:
    """synthesis.delta, or FAC's tau (the one stored with F)."""
    return tau if synthesis.delta is None else synthesis.delta


class Synthesize(Stage):
    """`raysel synthesize`: FAC of the input (the fac stage's report, `before`), then new samples for its
    missing features, written like a selection under selection/synthesis/ (records carry their
    provenance), with FAC before and after."""

    name = "synthesis"
    needs = ("stats", "fac")
    brief = ("n_kept", "fac_before", "fac_after")

    def __init__(self, synthesis: SynthesisConfig, fac: FACConfig, stack: ModelStack, storage: Storage, run: dict):
        """`run`: what the synthesis's manifest carries of the run (its config)."""
        self.synthesis, self.fac, self.stack, self.storage, self.run_info = synthesis, fac, stack, storage, run

    def side_sets(self) -> dict[str, list[str]]:
        return {"anchor": self.fac.anchor}

    def key(self, done: Done) -> dict | None:
        return None  # a costly generator, but asking for it again means sampling again

    def run(self, done: Done) -> dict:
        synthesis, storage, before = self.synthesis, self.storage, done["fac"]
        tau, d_sae = before["tau"], done["stats"]["d_sae"]  # FAC's, stored with F
        start = time.time()
        spans = pq.read_table(storage.path(paths.FAC, "missing_spans.parquet"), filesystem=storage.fs)
        delta = synthesis_delta(synthesis, tau)
        table = pq.read_table(storage.path(paths.FAC, "features.parquet"), filesystem=storage.fs)
        share = dict(zip(table["feature"].to_pylist(), table["anchor_share"].to_pylist()))
        missing = sorted(before["missing"], key=lambda j: (-share[j], j))  # the most common on the anchor first
        candidates, no_signal = synthesize(self.stack, synthesis, missing, spans, delta, judged_labels(storage))
        kept = candidates.filter(candidates["kept"])
        anchored = FeatureStore(storage.child("anchor")).profile(tau, d_sae)
        features = table["feature"].to_numpy()
        grown = FeatureStore(storage).profile(tau, d_sae).merge(Profile.of(kept, tau, d_sae))
        after, _ = fac(anchored, grown, features)
        storage.fs.create_dir(storage.path(paths.SYNTHESIS), recursive=True)
        pq.write_table(
            candidates.drop_columns(["feat_ids", "feat_max", "feat_sum", "n_tokens"]),
            storage.path(paths.SYNTHESIS, "candidates.parquet"),
            filesystem=storage.fs,
        )
        seconds = time.time() - start
        summary = {
            "delta": delta,
            "fac_before": before["fac"],
            "fac_after": after["fac"],
            "missing_before": len(before["missing"]),
            "missing_after": len(after["missing"]),
            "features_tried": len(set(candidates["feature"].to_pylist())),
            "no_signal": no_signal,
            **acceptance(candidates),
            "seconds_per_kept": round(seconds / kept.num_rows, 1) if kept.num_rows else None,
        }
        records = {
            r["id"]: json.dumps(
                json.loads(r["record"])
                | {"provenance": {k: r[k] for k in ("feature", "step", "prompt", "score", "generator")}}
            )
            for r in kept.to_pylist()
        }
        write_selection(
            storage,
            "synthesis",
            kept["id"].to_pylist(),
            kept["score"].to_numpy(),
            np.zeros(kept.num_rows, np.int64),
            records_of(kept["id"].to_pylist(), records, {i: turns(r) for i, r in records.items()}),
            {
                "config": self.run_info["config"],
                "method": "synthesis",
                "tau": tau,
                **summary,
                "counts": {"n_selected": kept.num_rows},
            },
        )
        log.info(
            "synthesis: FAC %.3f -> %.3f; %d of %d step-2 candidates above delta (%.0f %%), %d kept, %.1fs",
            summary["fac_before"],
            summary["fac_after"],
            round(summary["acceptance_rate"] * synthesis.n_contrastive * summary["features_tried"]),
            synthesis.n_contrastive * summary["features_tried"],
            100 * summary["acceptance_rate"],
            kept.num_rows,
            seconds,
        )
        return summary


def turns(record: str) -> list[dict] | None:
    """A synthesized record's chat turns, for the selection's `messages`; None where it has no text."""
    try:
        return normalize(json.loads(record), FieldMap()).messages
    except Rejected:
        return None
