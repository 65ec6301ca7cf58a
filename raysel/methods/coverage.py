"""SAE-GreedSelect: greedy maximum coverage of the activated features (coverage_kernel.py), on one
node, or past `distributed_rows` samples as RandGreeDi (Barbosa et al., 2015) over the cluster.

RandGreeDi splits the samples into m random partitions (a seeded hash of the id). Each partition
runs the coverage greedy for the whole budget k on its own, as one Ray Data group read straight
from the feature store, so no worker holds more than its partition. The m * k candidates come back
to the driver, the greedy runs again on them, and the answer is the better of that and the best
partition's own pick, by covered weight. In expectation that is within (1 - 1/e) / 2 of the
optimum; on real pools it is within a few percent of the single-node greedy (benchmarks/scale.py
measures the ratio).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from raysel.methods.base import Context, Method, MethodConfig, Picks, Pool

if TYPE_CHECKING:
    from raysel.core.features import FeatureStore

log = logging.getLogger(__name__)


class CoverageConfig(MethodConfig):
    """SAE-GreedSelect: greedy maximum coverage of activated features, with the saturation reset"""

    name: Literal["coverage"] = "coverage"
    idf: bool = False
    """weigh each feature's gain by its inverse document frequency"""
    distributed: Literal["auto", "on", "off"] = "auto"
    """`on` runs RandGreeDi, partitions greedy'd in parallel across the cluster then merged; `off` one greedy on the
    driver; `auto` RandGreeDi past `distributed_rows`"""
    distributed_rows: int = Field(2_000_000, gt=0)
    """the pool size past which `auto` distributes, and RandGreeDi's samples per partition"""
    partitions: int | None = Field(None, ge=2)
    """RandGreeDi's partitions (≥ 2); `null`: one per `distributed_rows`, at least 2"""


class Coverage(Method):
    Config = CoverageConfig
    memory_remedy = (
        "Set distributed: on in coverage's entry of select.methods (only RandGreeDi's candidates come back). "
    )

    def distributes(self, n: int) -> bool:
        return self.cfg.distributed == "on" or (self.cfg.distributed == "auto" and n > self.cfg.distributed_rows)

    def partitions(self, n: int) -> int:
        return partitions_for(n, self.cfg.distributed_rows, self.cfg.partitions)

    def driver_bytes(self, store: FeatureStore, k: int, ctx: Context) -> int:
        """The greedy's working memory over the pool; under RandGreeDi, over the m * k candidates that
        come back to the driver, beside the table they come in."""
        from raysel.methods.coverage_kernel import working_bytes  # numba: loaded when asked

        stats = store.summary()
        rows, per_row = stats["n_samples"], stats["mean_features_per_sample"]
        if not self.distributes(rows):
            return working_bytes(rows, round(rows * per_row))
        candidates = min(rows, k * self.partitions(rows))
        entries = round(candidates * per_row)
        return (
            working_bytes(candidates, entries)
            + CANDIDATE_BYTES_PER_ENTRY * entries
            + CANDIDATE_BYTES_PER_ROW * candidates
        )

    def pick(self, pool: Pool, k: int, ctx: Context) -> Picks:
        from raysel.methods.coverage_kernel import idf_weights, seeded_coverage  # numba: loaded when it runs
        from raysel.methods.randgreedi import randgreedi

        n = len(pool.ids)
        weights = idf_weights(pool.indices, n) if self.cfg.idf else None
        if self.distributes(n):
            ids, gains, settled = randgreedi(pool.store, ctx.tau, k, self.partitions(n), ctx.seed, weights)
            return Picks(ids, gains, settled)
        chosen = seeded_coverage(pool.ids, pool.indptr, pool.indices, k, ctx.seed, weights)
        return Picks(pool.ids[chosen.order].tolist(), chosen.gains, {"resets": chosen.resets})


# RandGreeDi's candidates on the driver, as Arrow: their int32 entries, and an id, partition and
# objective a row
CANDIDATE_BYTES_PER_ENTRY = 4
CANDIDATE_BYTES_PER_ROW = 108  # with the uint64 tie hash


def partitions_for(n: int, rows_per_partition: int, partitions: int | None) -> int:
    return partitions or max(2, math.ceil(n / rows_per_partition))
