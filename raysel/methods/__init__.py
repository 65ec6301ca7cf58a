"""The selection methods, and the one registry of them.

A method is one module: a config class (a `name: Literal[...]` plus its own settings) and a
Method subclass with `pick` (see base.py). To add one, write the module and add its class to
METHODS below; `select.methods` then accepts its name and its entry, and the select stage runs it.
"""

from __future__ import annotations

import functools
import operator
from typing import Annotated

from pydantic import Field

from raysel.methods import baselines, coverage, dense, fac, igds, kcenter, mona, simscale
from raysel.methods.base import Bars, Context, Method, MethodConfig, Picks, Pool

METHODS: dict[str, type[Method]] = {
    m.Config.model_fields["name"].default: m
    for m in (
        coverage.Coverage,
        simscale.SimScale,
        baselines.Random,
        baselines.Longest,
        mona.Mona,
        igds.IGDS,
        fac.FACSelect,
        kcenter.KCenter,
        dense.Dense,
    )
}

# Every selection's manifest compares it with these, at the same budget.
BASELINES: tuple[type[Method], ...] = (baselines.Random, baselines.Longest)

# A method entry: its name alone, or a mapping told apart by `name`.
MethodEntry = Annotated[
    functools.reduce(operator.or_, (m.Config for m in METHODS.values())), Field(discriminator="name")
]

# Settings that moved into a method's entry, and where they live now: (section, key) -> the new place.
LEGACY_KEYS: dict[tuple[str, str | None], str] = {
    ("task", None): "moved into the entries that read it: select.methods: [{name: mona, targets: [...]}] "
    "(igds likewise; dev_fraction and seed are igds settings)",
    ("mona", None): "moved into the method's entry: select.methods: [{name: mona, pooling: ..., similarity: ...}]",
    ("igds", None): "moved into the method's entry: select.methods: [{name: igds, targets: [...], candidates: ...}]",
    ("select", "idf"): "moved into the coverage entry: select.methods: [{name: coverage, idf: true}]",
    ("select", "distributed"): "moved into the coverage entry: select.methods: [{name: coverage, distributed: on}]",
    ("select", "distributed_rows"): "moved into the coverage entry: select.methods: "
    "[{name: coverage, distributed_rows: N}]",
    ("select", "partitions"): "moved into the coverage entry: select.methods: [{name: coverage, partitions: N}]",
    ("fac", "evaluated"): "moved into the fac entry: select.methods: [{name: fac, evaluated: [...]}]",
}


def build(entry: MethodConfig) -> Method:
    return METHODS[entry.name](entry)


__all__ = ["BASELINES", "Bars", "METHODS", "Context", "Method", "MethodConfig", "MethodEntry", "Picks", "Pool", "build"]
