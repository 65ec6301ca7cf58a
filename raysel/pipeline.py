"""The whole job, stage after stage, with the run manifest written last."""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import os

import ray

from raysel.config import RunConfig
from raysel.prepare import run_prepare
from raysel.storage import Storage

log = logging.getLogger(__name__)

PACKAGES = ("raysel", "ray", "torch", "transformers", "sae-lens", "datasets", "pyarrow", "numpy")


def init_ray(cfg: RunConfig) -> None:
    if ray.is_initialized():
        return
    # Under `ray job submit` RAY_ADDRESS names the cluster; otherwise start one here.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    local = {"num_cpus": cfg.ray.num_cpus} if address is None else {}
    ray.init(address=address, **local)


def run(cfg: RunConfig) -> dict:
    init_ray(cfg)
    storage = Storage(cfg.output.root, cfg.s3)
    log.info("run: output at %s", storage.uri())
    prepared = run_prepare(cfg, storage)
    manifest = {
        "config": cfg.public_dict(),
        "versions": versions(),
        "output": storage.uri(),
        "stages": {"prepare": prepared},
        "counts": {k: prepared[k] for k in ("n_input", "n_valid", "n_rejected", "rejected_by_reason")},
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_json("manifest.json", manifest)
    log.info("run: done; manifest at %s", storage.uri("manifest.json"))
    return manifest


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
