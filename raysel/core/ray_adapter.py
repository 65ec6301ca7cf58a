"""The thin adapter between raysel's stages and Ray (Ray Data for the work).

A unit of Ray work is a callable class that maps one pyarrow batch to another and holds
whatever is costly to build (a tokenizer, a model). What it needs from the
cluster is declared once, as Resources. With `actors` set it runs on a fixed
actor pool (models); with `actors=0` it runs as plain Ray tasks, each worker
process building the stage once (CPU-only transforms). `held_actors` keeps a
stage's actors alive across several small rounds; `map_files` reduces parquet
files with plain tasks."""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from raysel.core.progress import in_notebook
from raysel.core.section import Section

if TYPE_CHECKING:
    from ray.data import Dataset

    from raysel.core.encoder import EncodeConfig

log = logging.getLogger(__name__)
# Ray is imported where it is used: the config sections (RayConfig here) load without it.


class RayConfig(Section):
    address: str | None = None
    """a cluster to join (`auto`: the one `ray start` runs on this machine); `null`: `RAY_ADDRESS`, else a new local
    cluster, never one found running here"""
    num_cpus: int | None = Field(None, gt=0)
    """CPUs of a new local cluster"""


@dataclass(frozen=True)
class Resources:
    # A fixed pool: autoscaling GPU pools do not always scale up. Tasks (0) for
    # CPU transforms, since a pool holding every CPU starves the read tasks.
    actors: int = 0
    batch_size: int = 256
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # fractional values share a GPU between actors
    memory: int | None = None  # bytes; Ray Data does not count heap memory by itself
    custom: dict | None = None  # custom Ray resources, e.g. {"encoder": 1}: run only on nodes that offer them


def map_stage(ds: Dataset, stage: type, resources: Resources, **stage_kwargs) -> Dataset:
    """Run `stage(**stage_kwargs)` over every batch of `ds`."""
    common = dict(
        batch_size=resources.batch_size,
        batch_format="pyarrow",
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
        memory=resources.memory,
        resources=resources.custom,
    )
    from ray.data import ActorPoolStrategy

    if resources.actors:
        return ds.map_batches(
            stage, fn_constructor_kwargs=stage_kwargs, compute=ActorPoolStrategy(size=resources.actors), **common
        )
    return ds.map_batches(_in_task, fn_kwargs={"stage": stage, "spec": pickle.dumps(stage_kwargs)}, **common)


_built: dict = {}  # per worker process: (stage, its pickled kwargs) -> the stage object


def _in_task(batch, stage: type, spec: bytes):
    if (stage, spec) not in _built:
        _built[(stage, spec)] = stage(**pickle.loads(spec))
    return _built[(stage, spec)](batch)


class _Held:
    """Actor: one stage object, fed one batch a call."""

    def __init__(self, stage: type, kwargs: dict):
        self.stage = stage(**kwargs)

    def run(self, batch: pa.Table) -> pa.Table:
        return self.stage(batch)


@contextlib.contextmanager
def held_actors(stage: type, resources: Resources, **stage_kwargs) -> Iterator[Callable[[list], list]]:
    """`resources.actors` actors, each holding one `stage(**stage_kwargs)` for the whole `with`, as a
    function from a list of batches to their results (in order); the actors are killed on exit.

    For a loop of small rounds that depend on each other (synthesis' steps, IGDS's effects and then its
    null): each round on map_stage starts its pool again and pays every model's load again, which was
    most of a round. As in Ray Data's pools, an actor lost with its node is restarted and its calls in
    flight retried (an exception raised by the stage is not retried)."""
    import ray
    from ray.util import ActorPool

    options = dict(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, resources=resources.custom or {},
                   max_restarts=-1, max_task_retries=-1)  # fmt: skip
    if resources.memory:
        options["memory"] = resources.memory
    held = ray.remote(_Held).options(**options)
    actors = [held.remote(stage, stage_kwargs) for _ in range(resources.actors)]
    pool = ActorPool(actors)
    try:
        yield lambda batches: list(pool.map(lambda actor, batch: actor.run.remote(batch), batches))
    finally:
        for actor in actors:
            ray.kill(actor)


def map_files(files: list[str], fn, columns: list[str], filesystem=None):
    """fn(the file's columns as a table) for each parquet file, one plain Ray task a file, yielded in the
    files' order (so a merge is the same on every run), about two tasks per cluster CPU in flight.

    For the passes that reduce the feature store to small partials. Not Ray Data: its read_parquet took
    48 s to read the 1M-sample benchmark store (123 files, 9 GB; Ray 2.60, 2 CPUs, either datasource
    version) where these tasks take about 25 s; the stats stage fell from 114 s to 57 s with them."""
    import ray

    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending: collections.deque = collections.deque()
    for path in files:
        pending.append(_map_file().remote(path, fn, columns, filesystem))
        if len(pending) >= window:
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())


def _read_and_map(path: str, fn, columns: list[str], filesystem):
    return fn(pq.read_table(path, columns=columns, filesystem=filesystem))


@functools.cache
def _map_file():
    """_read_and_map as a Ray task of one CPU (made once, on first use)."""
    import ray

    return ray.remote(num_cpus=1)(_read_and_map)


def task_cpus() -> int:
    """The CPUs Ray gave the current task or actor (at least 1)."""
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def log_to_driver() -> None:
    """In an actor: raysel's INFO logs (progress per unit of work) go to the driver like the driver's own."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    # Under `ray job submit` RAY_ADDRESS names the cluster. Without an address Ray itself would join
    # any cluster `ray start` left on this machine, and the run would die with it: "local" starts
    # our own, as Ray's `address: auto` is the way to ask for that one.
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        log.info("ray: joined the cluster at %s (%s)", address, "ray.address" if cfg.address else "RAY_ADDRESS")
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus)
        log.info("ray: started a local cluster (set ray.address: auto to join one running on this machine)")


@contextlib.contextmanager
def quiet_off_a_terminal() -> Iterator[None]:
    """Ray Data's progress bars redraw many times a second: on a terminal that is a display, in a log
    (CI, `ray job logs`) a flood. Off a terminal (and out of a notebook) raysel's own progress lines
    take their place for the datasets made inside; the process's own settings come back after, so a
    script that also uses Ray Data keeps its bars."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start
    if not sys.stderr.isatty() and not in_notebook():
        context.enable_progress_bars = context.print_on_execution_start = False
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved


def model_resources(encode: EncodeConfig, actors: int, batch_size: int = 1) -> Resources:
    """What an actor holding a model needs, from the config alone: encode.num_gpus GPUs (Ray holds the
    actor until a node has them), encode.num_cpus CPUs and encode.memory_gb of heap."""
    return Resources(
        actors=actors,
        batch_size=batch_size,
        num_cpus=encode.num_cpus,
        num_gpus=encode.num_gpus,
        memory=int(encode.memory_gb * 2**30),
        custom=encode.resources or None,
    )
