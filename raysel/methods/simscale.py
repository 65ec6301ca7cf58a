"""SAE-SimScale: keep a sample unless it is Jaccard-similar to one already kept, with theta
binary-searched so the kept set reaches the budget (the filter itself, exact: simscale_kernel.py)."""

from __future__ import annotations

from typing import Literal

from raysel.core.features import FeatureStore, seeded_hash
from raysel.methods.base import Context, Method, MethodConfig, Picks, Pool


class SimScaleConfig(MethodConfig):
    name: Literal["simscale"] = "simscale"


class SimScale(Method):
    Config = SimScaleConfig

    def driver_bytes(self, store: FeatureStore, k: int, ctx: Context) -> int:
        from raysel.methods.simscale_kernel import working_bytes  # numba: loaded when asked

        stats = store.summary()
        return working_bytes(stats["n_samples"], stats["n_activated"], k)

    def pick(self, pool: Pool, k: int, ctx: Context) -> Picks:
        from raysel.methods.simscale_kernel import simscale

        kept = simscale(pool.indptr, pool.indices, k, tie=seeded_hash(pool.ids, ctx.seed))
        return Picks.unscored(pool.ids[kept.order].tolist(), {"theta": kept.theta, "theta_passes": kept.passes})
