"""The thin adapter between raysel's stages and Ray Data.

A stage is a callable class that maps one pyarrow batch to another and holds
whatever is costly to build (a tokenizer, a model) for the life of its actor.
What it needs from the cluster is declared once, as Resources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ray.data import ActorPoolStrategy, Dataset


@dataclass(frozen=True)
class Resources:
    actors: int = 1  # a fixed pool: autoscaling GPU pools do not always scale up
    batch_size: int = 256
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # fractional values share a GPU between actors
    memory: Optional[int] = None  # bytes; Ray Data does not count heap memory by itself


def map_stage(ds: Dataset, stage: type, resources: Resources, **stage_kwargs) -> Dataset:
    """Run `stage(**stage_kwargs)` over `ds` on a pool of actors."""
    return ds.map_batches(
        stage,
        fn_constructor_kwargs=stage_kwargs,
        batch_size=resources.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=resources.actors),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
        memory=resources.memory,
    )
