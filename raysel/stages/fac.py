"""The fac stage (`raysel fac`): FAC of the run's input against the anchor's task features (the
task_features stage's F), with the missing features' top-activating spans in the anchor. Writes
fac/features.parquet, fac/missing_spans.parquet and, last, fac/report.json. The FAC figures
themselves are raysel.core.fac's."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysel.config import ModelStack
from raysel.core import paths
from raysel.core.fac import FACConfig, fac
from raysel.core.features import FeatureStore
from raysel.core.spans import find_spans
from raysel.core.storage import Storage
from raysel.stages.base import Done, Stage

log = logging.getLogger(__name__)


class MeasureFAC(Stage):
    name = "fac"
    needs = ("encode", "stats", "task_features")
    brief = ("fac",)

    def __init__(self, fac: FACConfig, stack: ModelStack, storage: Storage):
        self.fac, self.stack, self.storage = fac, stack, storage

    def side_sets(self) -> dict[str, list[str]]:
        return {"anchor": self.fac.anchor}

    def key(self, done: Done) -> dict:
        return {
            "encode_fingerprint": done["encode"]["fingerprint"],
            "anchor": done["anchor"]["encode"]["fingerprint"],  # its store: the spans come from it
            "task_features": done["task_features"]["features"],
            "tau": done["task_features"]["tau"],
        }

    def run(self, done: Done) -> dict:
        storage, tau, d_sae = self.storage, done["task_features"]["tau"], done["stats"]["d_sae"]
        anchor = FeatureStore(storage.child("anchor"))
        anchored = anchor.profile(tau, d_sae)
        evaluated = FeatureStore(storage).profile(tau, d_sae)  # per block: never the whole store here
        features = np.array(done["task_features"]["features"], dtype=np.int64)
        summary, table = fac(anchored, evaluated, features)
        spans = find_spans(self.stack, anchor.storage, summary["missing"])
        storage.remove(f"{paths.FAC}/report.json")
        storage.fs.create_dir(storage.path(paths.FAC), recursive=True)
        pq.write_table(table, storage.path(paths.FAC, "features.parquet"), filesystem=storage.fs)
        pq.write_table(spans, storage.path(paths.FAC, "missing_spans.parquet"), filesystem=storage.fs)
        report = {
            **summary,
            "tau": tau,
            "tau_source": done["task_features"]["tau_source"],
            "n_anchor": anchored.rows,
            "n_evaluated": evaluated.rows,
            "feature_source": done["task_features"]["source"],
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
            "fac: %.3f (%d of %d anchor features; frequency-weighted %.3f, magnitude-weighted %.3f); %d missing; "
            "tau %.4g, %s",
            summary["fac"],
            summary["n_covered"],
            summary["n_in_anchor"],
            summary["fac_frequency"],
            summary["fac_magnitude"],
            len(summary["missing"]),
            tau,
            report["tau_source"],
        )
        return {k: v for k, v in report.items() if k != "missing_examples"}
