"""The fac stage (`raysel fac`): FAC of the run's input against the anchor's task features, with the
missing features' top-activating spans. Writes fac/features.parquet, fac/missing_spans.parquet
and, last, fac/report.json. The FAC figures themselves are raysel.methods.fac's."""

from __future__ import annotations

import logging

import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysel.core import paths
from raysel.core.features import FeatureStore
from raysel.methods import Context
from raysel.methods.fac import anchor_spans, fac, feature_source, task_feature_set
from raysel.stages.base import Stage

log = logging.getLogger(__name__)


class MeasureFAC(Stage):
    name = "fac"
    needs = ("stats",)

    def __init__(self, ctx: Context, top_n: int):
        self.ctx, self.top_n, self.storage = ctx, top_n, ctx.storage

    def key(self) -> dict | None:
        return None  # cheap next to encoding, and its side set resumes on its own

    def run(self) -> dict:
        ctx, storage = self.ctx, self.storage
        anchor = ctx.side_set("anchor", ctx.fac.anchor)
        anchored = anchor.profile(ctx.tau, ctx.d_sae)
        evaluated = FeatureStore(storage).profile(ctx.tau, ctx.d_sae)  # per block: never the whole store here
        features = task_feature_set(ctx)
        summary, table = fac(anchored, evaluated, features)
        spans = anchor_spans(ctx.stack, self.top_n, anchor, summary["missing"])
        storage.remove(f"{paths.FAC}/report.json")
        storage.fs.create_dir(storage.path(paths.FAC), recursive=True)
        pq.write_table(table, storage.path(paths.FAC, "features.parquet"), filesystem=storage.fs)
        pq.write_table(spans, storage.path(paths.FAC, "missing_spans.parquet"), filesystem=storage.fs)
        report = {
            **summary,
            "tau": ctx.tau,
            "n_anchor": anchored.rows,
            "n_evaluated": evaluated.rows,
            "feature_source": feature_source(ctx.fac),
            "missing_examples": {
                str(j): [
                    {"id": r["id"], "value": r["value"], "text": "".join(r["tokens"])}
                    for r in spans.filter(pc.equal(spans["feature"], j)).to_pylist()[:3]
                ]
                for j in summary["missing"]
            },
        }
        storage.write_json(f"{paths.FAC}/report.json", report)
        log.info(
            "fac: %.3f (%d of %d anchor features; frequency-weighted %.3f, magnitude-weighted %.3f); %d missing",
            summary["fac"],
            summary["n_covered"],
            summary["n_in_anchor"],
            summary["fac_frequency"],
            summary["fac_magnitude"],
            len(summary["missing"]),
        )
        return {k: v for k, v in report.items() if k != "missing_examples"}
