"""Means over seeds with Student's t intervals, and paired differences on matching seeds: what
`raysel evaluate` reports of each method against random."""

from __future__ import annotations

import math

import numpy as np


def mean_interval(values, level: float = 0.95) -> dict:
    """The mean and its t interval; the interval is null below two values (one seed says nothing of spread)."""
    from scipy import stats

    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_interval: no values")
    mean = float(x.mean())
    if x.size < 2:
        return {"mean": mean, "ci": None, "n": int(x.size)}
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return {"mean": mean, "ci": [mean - half, mean + half], "n": int(x.size)}


def paired_difference(a: dict, b: dict, level: float = 0.95) -> dict | None:
    """a - b over the keys (seeds) both have, each pair differenced first: the seed's shared luck
    (its draw, its adapter's start) cancels. None when no key is shared."""
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    return mean_interval([a[k] - b[k] for k in shared], level) | {"seeds": shared}
