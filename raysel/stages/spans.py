"""The spans stage: the top-activating spans of the features the report shows, the ones the primary
selection (the first of select.methods) covers most and the pool features it misses
(raysel.core.spans reads them from what encode kept). Writes stats/spans.parquet; its record lists the
two groups of features."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysel.config import ModelStack, SelectConfig
from raysel.core import paths
from raysel.core.spans import find_spans
from raysel.core.storage import Storage
from raysel.stages.base import Done, Stage

SHOWN = 20  # features of each group


class Spans(Stage):
    name = "spans"
    needs = ("stats", "select")
    brief = ("primary",)

    def __init__(self, stack: ModelStack, select: SelectConfig, storage: Storage):
        self.stack, self.storage = stack, storage
        self.primary = select.methods[0].name if select.methods else None

    def key(self, done: Done) -> dict:
        return {"stats": done["stats"]["key"], "select": done["select"]["key"], "primary": self.primary, "shown": SHOWN}

    def run(self, done: Done) -> dict:
        storage, primary = self.storage, self.primary
        stats = pq.read_table(storage.path(paths.FEATURE_STATS), columns=["doc_freq"], filesystem=storage.fs)
        doc_freq = stats["doc_freq"].to_numpy()
        hits = np.zeros(doc_freq.size, np.int64)
        if primary:
            ids = pq.read_table(storage.path(paths.selection(primary, "selected.parquet")), columns=["id"],
                                filesystem=storage.fs)["id"].to_pylist()  # fmt: skip
            hits = selected_hits(storage, ids, doc_freq.size)
        covered = [int(j) for j in np.lexsort((np.arange(hits.size), -hits)) if hits[j] > 0][:SHOWN]
        unseen = (j for j in np.lexsort((np.arange(hits.size), -doc_freq)) if doc_freq[j] > 0 and hits[j] == 0)
        missed = [int(j) for j in itertools.islice(unseen, SHOWN)]
        spans = find_spans(self.stack, storage, covered + missed)
        storage.fs.create_dir(storage.path(paths.STATS), recursive=True)
        pq.write_table(spans, storage.path(paths.SPANS), filesystem=storage.fs)
        # the covered features' counts in the selection, so the report does not read the sets again
        selected = {str(j): int(hits[j]) for j in covered}
        return {
            "primary": primary,
            "covered": covered,
            "missed": missed,
            "selected": selected,
            "n_spans": spans.num_rows,
        }


def selected_hits(storage: Storage, ids: list[str], d_sae: int) -> np.ndarray:
    """Per feature, how many of the samples `ids` activate it, from the activated sets the statistics
    wrote at the run's tau (not a pass over the store)."""
    sets = pq.ParquetDataset(
        storage.path(paths.ACTIVATED), filesystem=storage.fs, filters=pc.field("id").isin(ids)
    ).read(columns=["feats"])
    return np.bincount(pc.list_flatten(sets["feats"]).to_numpy(), minlength=d_sae)
