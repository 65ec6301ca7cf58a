"""What every selection method is: a config of its own (told apart by `name`) and one class with
one interface. The select stage builds the pool once, gives each method its budget and a context,
and writes whatever it picks the same way.

    needs                the plan's stages it reads besides stats (task_features: F, in ctx.task_features)
    side_inputs(fac)     the named lists of paths it reads besides the pool (targets, an anchor), each
                         named as the config field that holds it: the select stage's resume key
                         holds their content fingerprints in place of the paths as written
    driver_bytes(...)    what pick holds on the driver beside the pool, for the memory check (and
                         memory_remedy, what to do when that is too much)
    pick(pool, k, ctx)   Picks: the chosen ids in order, a score per pick, details for the manifest
    figures(details)     what the run report draws of those details, beside every method's curves
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import Field

from raysel.core.features import FeatureStore, document_frequency
from raysel.core.section import Section

if TYPE_CHECKING:
    from raysel.config import ModelStack
    from raysel.core.fac import FACConfig
    from raysel.core.storage import Storage


class MethodConfig(Section):
    """The settings every method entry has; a method's config adds its own and a `name: Literal[...]`."""

    name: str
    budget: float | None = Field(None, gt=0)
    """a count (≥ 1) or a fraction of the encoded pool (< 1), as `select.budget`; `null`: `select.budget`"""


@dataclass
class Pool:
    """What the methods pick from: the activated sets of the run's feature store (CSR, sorted by
    id), each sample's response length, and the store itself for methods that read more of it."""

    ids: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    response_tokens: np.ndarray
    store: FeatureStore

    @functools.cached_property
    def n_features(self) -> int:
        """How many features any sample activates."""
        return int(np.count_nonzero(document_frequency(self.indices)))

    def rows_of(self, ids) -> np.ndarray:
        return np.searchsorted(self.ids, np.asarray(ids, dtype=object)) if len(ids) else np.empty(0, np.int64)


@dataclass
class Context:
    """What a method may use besides the pool and its own config."""

    tau: float  # the run's activation threshold, as the statistics used it
    seed: int  # select.seed
    d_sae: int
    storage: Storage  # the run's output root
    stack: ModelStack  # for methods that run the model (IGDS's interventions, FAC's judge)
    fac: FACConfig  # the task features' definition, shared with `raysel fac`
    side_set: Callable[[str, list[str]], FeatureStore]  # encodes a side input (once) and returns its store
    task_features: np.ndarray | None = None  # F, from the task_features stage, for methods that need it
    fac_tau: float | None = None  # the threshold stored with F (fac.tau, or calibrated on the reference)


@dataclass
class Bars:
    """A figure a method adds to the run report: one bar a label, green above zero and red below."""

    title: str
    labels: list[str]
    values: list[float]
    xlabel: str
    ylabel: str


@dataclass
class Picks:
    ids: list[str]  # in selection order
    scores: np.ndarray  # the gain or score of each pick; NaN where the method has none
    details: dict = field(default_factory=dict)  # what it settled on, for the selection's manifest

    @classmethod
    def unscored(cls, ids: list[str], details: dict | None = None) -> Picks:
        return cls(list(ids), np.full(len(ids), np.nan), details or {})


class Method:
    """A selection method. A subclass sets `Config` and implements `pick`."""

    Config: ClassVar[type[MethodConfig]]
    needs: ClassVar[tuple[str, ...]] = ()  # stages of the plan whose records it reads (through the context)
    ranks_by_score: ClassVar[bool] = False  # its scores rank the pool (the report plots them)
    memory_remedy: ClassVar[str] = ""  # what the memory check's refusal advises when it holds most; "": leave it out

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.cfg.name

    def side_inputs(self, fac: FACConfig) -> dict[str, list[str]]:
        """Side sets by name, from its config (and fac.anchor, the task's): the run encodes them before
        select, with its own pass when that is due, and ctx.side_set(name, paths) returns one's store."""
        return {}

    def driver_bytes(self, store: FeatureStore, k: int, ctx: Context) -> int:
        """The driver memory `pick` takes beside the pool's CSR, estimated from the store's counts before
        anything is read (the select stage's memory check). Most methods stream or work on the CSR."""
        return 0

    def pick(self, pool: Pool, k: int, ctx: Context) -> Picks:
        raise NotImplementedError

    @classmethod
    def figures(cls, details: dict) -> list[Bars]:
        """The report's figures of what a selection settled on (its manifest's `details`); none by default."""
        return []
