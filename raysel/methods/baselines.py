"""The baselines every selection is measured against: `random` (seeded by select.seed) and
`longest` (most response tokens first: the number of activated features tracks length, so this
is a strong baseline for coverage)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from raysel.core.features import seeded_hash
from raysel.methods.base import Context, Method, MethodConfig, Picks, Pool


class RandomConfig(MethodConfig):
    """Samples drawn at random, seeded by `select.seed`"""

    name: Literal["random"] = "random"


class Random(Method):
    Config = RandomConfig

    def pick(self, pool: Pool, k: int, ctx: Context) -> Picks:
        order = np.random.default_rng(ctx.seed).permutation(len(pool.ids))[:k]
        return Picks.unscored(pool.ids[order].tolist())


class LongestConfig(MethodConfig):
    """The most response tokens first"""

    name: Literal["longest"] = "longest"


class Longest(Method):
    Config = LongestConfig

    def pick(self, pool: Pool, k: int, ctx: Context) -> Picks:
        order = np.lexsort((seeded_hash(pool.ids, ctx.seed), -pool.response_tokens))[:k]
        return Picks.unscored(pool.ids[order].tolist())
