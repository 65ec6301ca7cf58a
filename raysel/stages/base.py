"""What a stage is, and the one mechanism that runs and commits every unit of work.

A stage declares its name, the stages it needs, its resume key and the Ray resources its work
asks for. `key(done)` and `run(done)` receive the records of the stages it needs (and of the side
sets it reads), never another stage's marker read by name. `Executor` owns the rest, as datatrove's
executor does: it runs the `needs` closure of the targets in plan order, skips a stage whose marker
holds the same key, and otherwise removes the marker, runs the stage, and writes the marker last
(with the seconds it took), so a crash at any point leaves the stage unfinished, never
half-finished. The encode stage commits each shard through the same `commit`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import ClassVar

from raysel.core import paths
from raysel.core.ray_adapter import Resources
from raysel.core.storage import Storage

log = logging.getLogger(__name__)

Done = dict[str, dict]  # stage name (or side set name) -> its committed record


def normalized(key: dict | None) -> dict | None:
    """The key as its marker stores it (JSON), so a key read back compares equal."""
    return None if key is None else json.loads(json.dumps(key, sort_keys=True, default=str))


def committed(storage: Storage, marker: str, key: dict | None) -> dict | None:
    """The marker's record when it exists with this key; None when the work must be done."""
    done = storage.read_json(marker)
    return done if done is not None and key is not None and done.get("key") == normalized(key) else None


def commit(storage: Storage, marker: str, key: dict | None, work: Callable[[], dict]) -> dict:
    """Skip when `marker` holds `key`; else remove the marker, run `work`, write the marker last.
    A None key always runs."""
    done = committed(storage, marker, key)
    if done is not None:
        log.info("%s: up to date; skipping", marker)
        return done
    storage.remove(marker)
    record = {**work(), "key": normalized(key)}
    storage.write_json(marker, record)
    return record


class Stage:
    name: ClassVar[str]
    needs: tuple[str, ...] = ()  # the stages whose records key() and run() read; an instance may narrow or add
    uses: tuple[str, ...] = ()  # stages whose records it reads when they ran (or were given), never run for it
    brief: ClassVar[tuple[str, ...]] = ()  # the record's keys `raysel status` shows
    side_until: ClassVar[str] = "stats"  # how far its side sets go through the plan (evaluate's: prepare)
    storage: Storage

    def side_sets(self) -> dict[str, list[str]]:
        """Sets of samples it reads besides the run's input, by name: each goes through the plan up to
        `side_until` under <root>/<name>/ first, and its records arrive in `done[name]`."""
        return {}

    def key(self, done: Done) -> dict | None:
        """What its outputs depend on; the same key on a re-run skips it. None: never skipped."""
        raise NotImplementedError

    def resources(self) -> Resources | None:
        """What each of its Ray workers asks for; None: it runs on the driver and in plain Ray tasks."""
        return None

    def run(self, done: Done) -> dict:
        """Do the work, write the outputs, return the summary (kept in its marker and the manifest)."""
        raise NotImplementedError


def closure(stages: Sequence, targets: Sequence[str]) -> list:
    """The targets and every stage they need, transitively, in plan order (stages or their classes)."""
    by_name = {s.name: s for s in stages}
    unknown = [t for t in targets if t not in by_name]
    if unknown:
        raise KeyError(f"no stage named {unknown[0]!r} in the plan ({', '.join(by_name)})")
    wanted, todo = set(), list(targets)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += by_name[name].needs
    return [s for s in stages if s.name in wanted]


class Executor:
    """Runs a plan's stages toward its targets. `side_sets(sets, done, until)` runs a stage's side sets
    (paths by name) through the same plan up to `until` and returns their records by name; `given`
    holds records taken as done (a finished run's)."""

    def __init__(
        self,
        stages: Sequence[Stage],
        side_sets: Callable[[dict[str, list[str]], Done, str], Done] | None = None,
        given: Done | None = None,
    ):
        self.stages, self.side_sets, self.given = list(stages), side_sets, dict(given or {})

    def run(self, targets: Sequence[str]) -> Done:
        done: Done = {}
        for stage in closure(self.stages, targets):
            if stage.name in self.given:
                done[stage.name] = self.given[stage.name]
                continue
            inputs = {n: done[n] for n in stage.needs} | {
                n: done.get(n, self.given.get(n)) for n in stage.uses if n in done or n in self.given
            }
            if sets := stage.side_sets():
                inputs |= self.side_sets(sets, done, stage.side_until)
            done[stage.name] = execute(stage, inputs)
        return done


def execute(stage: Stage, done: Done | None = None) -> dict:
    """Run a stage unless its marker says it is done with the same key; its record either way. The
    record carries the seconds the stage took; each stage is logged as it starts and ends."""
    done = done or {}

    def timed() -> dict:
        start = time.time()
        log.info("%s: starting", stage.name)
        record = stage.run(done)
        seconds = round(time.time() - start, 2)
        log.info("%s: done in %.1fs", stage.name, seconds)
        return {**record, "seconds": seconds}

    return commit(stage.storage, paths.marker(stage.name), stage.key(done), timed)
