"""What a stage is, and the one mechanism that commits every unit of work.

A stage declares its name, the stages it needs, its resume key and the Ray resources its work
asks for, and does its work in `run()`, which returns its summary. `execute(stage)` owns resume:
it skips a stage whose marker holds the same key, and otherwise removes the marker, runs the
stage and writes the marker last, so a crash at any point leaves the stage unfinished, never
half-finished. The encode stage commits each shard through the same `commit`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import ClassVar

from raysel.core import paths
from raysel.core.ray_adapter import Resources
from raysel.core.storage import Storage

log = logging.getLogger(__name__)


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
    needs: ClassVar[tuple[str, ...]] = ()  # the stages whose outputs it reads
    storage: Storage

    def key(self) -> dict | None:
        """What its outputs depend on; the same key on a re-run skips it. None: never skipped."""
        raise NotImplementedError

    def resources(self) -> Resources | None:
        """What each of its Ray workers asks for; None: it runs on the driver and in plain Ray tasks."""
        return None

    def run(self) -> dict:
        """Do the work, write the outputs, return the summary (kept in its marker and the manifest)."""
        raise NotImplementedError


def execute(stage: Stage) -> dict:
    """Run a stage unless its marker says it is done with the same key; its record either way."""
    return commit(stage.storage, paths.marker(stage.name), stage.key(), stage.run)
