"""The Python API: a run from a notebook or a script, as `raysel run` makes it.

    import raysel

    r = raysel.run("my-config.yaml", select__budget=0.05)  # select.budget, as --set writes it
    r.selection("coverage")   # a datasets.Dataset
    r.features()              # the feature store, a Ray Dataset
    r.status(), r.report_path

A config is a YAML path, a dict or a RunConfig; keyword overrides name a key with `__` for its dots
(the pydantic-settings convention). Progress shows as tqdm bars in Jupyter and on a terminal, and
raysel's log lines reach a notebook that has configured no logging.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from raysel.config import RunConfig, load_config
from raysel.core import paths
from raysel.core.features import FeatureStore
from raysel.core.storage import Storage
from raysel.pipeline import run as run_plan
from raysel.pipeline import verb_targets
from raysel.stages.publish import check_finished
from raysel.status import run_status

if TYPE_CHECKING:
    import datasets
    import ray.data


@dataclass
class Run:
    """A run's root and config, and what it wrote, read back on demand."""

    config: RunConfig
    manifest: dict

    @property
    def storage(self) -> Storage:
        return Storage(self.config.output.root, self.config.s3)

    @property
    def root(self) -> str:
        return self.storage.uri()

    def status(self) -> dict:
        """Per stage: done, in progress or pending (what `raysel status ROOT` prints)."""
        return run_status(self.storage)

    def selection(self, method: str) -> datasets.Dataset:
        """One method's selection, as a trainer reads it: the dataset files under selection/<method>/data/."""
        import datasets

        check_finished(self.storage, method, "selection")
        folder = f"{paths.selection(method)}/data"
        return datasets.Dataset(pq.read_table(self.storage.path(folder), filesystem=self.storage.fs))

    def features(self) -> ray.data.Dataset:
        """The feature store: id, n_tokens and each activated feature's max and sum, per sample."""
        return FeatureStore(self.storage).dataset()

    @property
    def report_path(self) -> str | None:
        """report.html, where the run wrote one."""
        return self.manifest.get("stages", {}).get("report", {}).get("page")


def run(config: str | Path | dict | RunConfig, *, force: bool = False, **overrides: Any) -> Run:
    """The plan up to select (and the report, unless output.report is off); finished stages are
    skipped, as on the command line. `force`: as --force."""
    cfg = resolve(config, overrides)
    show_progress()
    manifest = run_plan(cfg, until=verb_targets("run", cfg), force=force)
    return Run(cfg, manifest)


def resolve(config: str | Path | dict | RunConfig, overrides: dict[str, Any]) -> RunConfig:
    sets = [f"{key.replace('__', '.')}={json.dumps(value)}" for key, value in overrides.items()]  # YAML reads JSON
    if isinstance(config, RunConfig):
        config = config.model_dump()  # secrets stay SecretStr, not the masked JSON form
    if isinstance(config, dict):
        return load_config(None, sets, raw=config)
    return load_config(str(config), sets)


def show_progress() -> None:
    """raysel's INFO lines where nothing was set up to show them (a fresh notebook, a script)."""
    package = logging.getLogger("raysel")
    if not logging.getLogger().handlers and not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
