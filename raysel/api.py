"""The Python API: a run from a notebook or a script, as `raysel run` makes it.

    import raysel

    r = raysel.run("my-config.yaml", select__budget=0.05)  # select.budget, as --set writes it
    r.selection("coverage")   # a datasets.Dataset
    r.features()              # the feature store, a Ray Dataset
    r.status(), r.report_path

A config is a YAML path, a dict or a RunConfig; keyword overrides name a key with `__` for its dots
(the pydantic-settings convention). The input may be in memory instead, `data=` a datasets.Dataset
or a Ray Dataset: it is written once as parquet under the output root's input/, named by a digest of
its rows, so a run of the same rows again resumes, as a run of the same files does. Progress shows
as tqdm bars in Jupyter and on a terminal, and raysel's log lines reach a notebook that has
configured no logging.
"""

from __future__ import annotations

import hashlib
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


def run(
    config: str | Path | dict | RunConfig,
    *,
    data: datasets.Dataset | ray.data.Dataset | None = None,
    force: bool = False,
    **overrides: Any,
) -> Run:
    """The plan up to select (and the report, unless output.report is off); finished stages are
    skipped, as on the command line. `data`: the input, in memory (the config's input.paths and
    input.hf_dataset are then not read; its field mapping and shape are). `force`: as --force."""
    if data is not None:
        overrides = {"input__paths": ["(data=)"], "input__hf_dataset": None} | overrides
    cfg = resolve(config, overrides)
    show_progress()
    if data is not None:
        from raysel.core.ray_adapter import init_ray

        init_ray(cfg.ray)
        staged = stage_input(data, Storage(cfg.output.root, cfg.s3))
        cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"paths": [staged], "format": "parquet"})})
    manifest = run_plan(cfg, until=verb_targets("run", cfg), force=force)
    return Run(cfg, manifest)


def stage_input(data: datasets.Dataset | ray.data.Dataset, storage: Storage) -> str:
    """Where `data` lies as parquet files under the root's input/<digest>/, written unless a finished
    write of the same rows is there. The digest adds up each row's hash, so it does not depend on how
    the rows fall into blocks, and it is read in one streamed pass, never gathered on the driver."""
    import ray.data

    ds = ray.data.from_huggingface(data) if not isinstance(data, ray.data.Dataset) else data
    sums = ds.map_batches(_row_hashes, batch_format="pyarrow").sum(["n", "h0", "h1"]) or {}
    n, h0, h1 = (int(sums.get(f"sum({c})", 0)) for c in ("n", "h0", "h1"))
    if not n:
        raise ValueError("raysel.run: data= holds no rows")
    digest = hashlib.sha256(f"{n}:{h0}:{h1}".encode()).hexdigest()[:16]
    folder, done = f"input/{digest}", f"input/{digest}.json"
    if storage.read_json(done) != {"rows": n}:  # a write that stopped part way is redone whole
        storage.remove(folder)
        ds.write_parquet(storage.path(folder), filesystem=storage.fs)
        storage.write_json(done, {"rows": n})
    logging.getLogger(__name__).info("raysel.run: data= (%d rows) is %s", n, storage.uri(folder))
    return storage.uri(folder)


def _row_hashes(batch):
    """Per row: 1, and two 31-bit halves of a hash of its JSON, summed later (sums of 31-bit values stay
    exact in int64 past a billion rows)."""
    import pyarrow as pa

    h = [hashlib.blake2b(json.dumps(r, sort_keys=True, default=str).encode(), digest_size=8).digest()
         for r in batch.to_pylist()]  # fmt: skip
    words = [int.from_bytes(d, "little") for d in h]
    return pa.table({"n": [1] * len(h), "h0": [w & 0x7FFFFFFF for w in words], "h1": [w >> 33 for w in words]})


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
