"""The task_features stage: F, the anchor's task-relevant features, and the threshold tau that goes
with it, computed once per (anchor, reference, model, SAE, fac settings) and read by `raysel fac`,
`raysel synthesize` and method `fac` alike.

tau is fac.tau, or calibrated on the reference to fac.target_active activated features a sample:
never on the run's input, so F, F(P) and F(Q) hold for every dataset compared.

F is fac.features, or the fac.n_features features most enriched on the anchor over the reference
(fac.reference, by default the bundled P3 mix, data/reference.jsonl); with fac.judge_task, those of them an LLM judge
finds relevant (fac/judged.parquet holds every verdict). Its key holds the two side sets' encode
fingerprints, which cover their content, the model, the SAE's weights and the dtype: a swapped
anchor, an edited reference or another SAE recomputes F.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq

from raysel.config import ModelStack
from raysel.core import paths
from raysel.core.fac import FACConfig, enriched_features, feature_source, threshold_source
from raysel.core.features import FeatureStore
from raysel.core.judge import judge_features, kept
from raysel.core.spans import find_spans
from raysel.core.storage import Storage
from raysel.stages.base import Done, Stage

log = logging.getLogger(__name__)

JUDGE_KEYS = {"n_features", "judge_task", "judge_generator", "judge_keep"}


class TaskFeatures(Stage):
    name = "task_features"
    needs = ("stats",)
    brief = ("n_task_features", "source")

    def __init__(self, fac: FACConfig, stack: ModelStack, storage: Storage):
        self.fac, self.stack, self.storage = fac, stack, storage

    def side_sets(self) -> dict[str, list[str]]:
        reference = {"reference": self.fac.reference or [paths.reference_data()]}
        if self.fac.features:  # a listed F still needs the reference for a calibrated tau
            return {} if self.fac.tau is not None else reference
        return {"anchor": self.fac.anchor} | reference

    def listed(self) -> list[int]:
        """fac.features, when the user gives F: sorted, each once."""
        return sorted(set(self.fac.features))

    def key(self, done: Done) -> dict:
        sides = {name: done[name]["encode"]["fingerprint"] for name in self.side_sets()}
        threshold = {"tau": self.fac.tau} if self.fac.tau is not None else {"target_active": self.fac.target_active}
        if self.fac.features:
            return {"features": self.listed(), **threshold, **sides}
        return sides | threshold | self.fac.model_dump(include=JUDGE_KEYS)

    def run(self, done: Done) -> dict:
        tau = self.threshold()
        features = np.array(self.listed(), dtype=np.int64) if self.fac.features else self.compute(done, tau)
        log.info("task_features: %d features, %s; tau %.4g, %s", features.size, feature_source(self.fac), tau,
                 threshold_source(self.fac))  # fmt: skip
        return {
            "features": features.tolist(),
            "n_task_features": int(features.size),
            "source": feature_source(self.fac),
            "tau": tau,
            "tau_source": threshold_source(self.fac),
        }

    def threshold(self) -> float:
        """fac.tau, or the tau at which reference samples have fac.target_active activated features."""
        if self.fac.tau is not None:
            return self.fac.tau
        return FeatureStore(self.storage.child("reference")).calibrate(self.fac.target_active)["tau"]

    def compute(self, done: Done, tau: float) -> np.ndarray:
        d_sae = done["stats"]["d_sae"]
        anchor = FeatureStore(self.storage.child("anchor"))
        reference = FeatureStore(self.storage.child("reference")).table()
        features = enriched_features(anchor.table(), reference, tau, d_sae, self.fac.n_features)
        return self.judged(anchor, features) if self.fac.judge_task else features

    def judged(self, anchor: FeatureStore, features: np.ndarray) -> np.ndarray:
        """Those of `features` the LLM judge keeps, shown their spans in the anchor."""
        spans = find_spans(self.stack, anchor.storage, features.tolist())
        verdicts = judge_features(self.stack, self.fac, spans, features.tolist())
        self.storage.fs.create_dir(self.storage.path(paths.FAC), recursive=True)
        pq.write_table(verdicts, self.storage.path(paths.FAC, "judged.parquet"), filesystem=self.storage.fs)
        chosen = kept(verdicts, self.fac.judge_keep)
        if not chosen:
            log.warning(
                "task_features: the judge kept none of the %d features, so F is empty and FAC means nothing; see "
                "its verdicts in fac/judged.parquet, and try a stronger fac.judge_generator or fac.judge_keep: maybe",
                len(features),
            )
        log.info("task_features: the judge kept %d of %d enriched features as relevant to %r (%s or better)",
                 len(chosen), len(features), self.fac.judge_task, self.fac.judge_keep)  # fmt: skip
        return np.array(chosen, dtype=np.int64)
