"""The whole job, stage after stage, with the run manifest written last."""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import os

import pyarrow.parquet as pq
import ray

from raysel.activation import resolve_tau
from raysel.config import RunConfig
from raysel.encode import read_features, run_encode
from raysel.models import resolve_device
from raysel.prepare import run_prepare
from raysel.sae import default_sae_dir, train_sae
from raysel.selection import run_select
from raysel.stats import run_stats
from raysel.task import measure_fac, run_synthesis
from raysel.storage import Storage, StorageError, redact

log = logging.getLogger(__name__)

PACKAGES = ("raysel", "ray", "torch", "transformers", "sae-lens", "datasets", "pyarrow", "numpy")


def init_ray(cfg: RunConfig) -> None:
    if ray.is_initialized():
        return
    # Under `ray job submit` RAY_ADDRESS names the cluster; otherwise start one here.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    local = {"num_cpus": cfg.ray.num_cpus} if address is None else {}
    ray.init(address=address, **local)


def run(cfg: RunConfig, until: str = "select", train_missing_sae: bool = False) -> dict:
    """Run the stages up to `until` (train-sae, encode, stats or select); finished ones are skipped."""
    storage = Storage(cfg.output.root, cfg.s3)
    storage.check()
    init_ray(cfg)
    try:
        return run_stages(cfg, storage, until, train_missing_sae)
    except OSError as err:
        if "AWS Error" not in str(err):
            raise
        raise StorageError(f"output root {storage.root}: {redact(str(err), cfg.s3)}; "
                           "finished work is committed, re-run to resume") from None


def run_stages(cfg: RunConfig, storage: Storage, until: str, train_missing_sae: bool) -> dict:
    log.info("run: output at %s", storage.uri())
    stages = {"prepare": run_prepare(cfg, storage)}
    default_missing = cfg.sae.path is None and not cfg.sae.release and not (default_sae_dir(cfg) / "cfg.json").is_file()
    if until == "train-sae" or (train_missing_sae and default_missing):
        stages["train_sae"] = run_train_sae(cfg, storage)
    if until in ("encode", "stats", "select", "fac", "synthesize"):
        stages["encode"] = run_encode(cfg, storage, stages["prepare"])
    if until in ("stats", "select", "fac", "synthesize"):
        encoded = stages["encode"]
        tau = resolve_tau(storage, cfg)
        stages["stats"] = run_stats(storage, read_features(storage), encoded["d_sae"], tau,
                                    cfg.stats.top_n, encoded["fingerprint"])
    prepared = stages["prepare"]
    manifest = {
        "config": cfg.public_dict(),
        "versions": versions(),
        "output": storage.uri(),
        "model": cfg.model.name,
        "stages": stages,
        "counts": {k: prepared[k] for k in ("n_input", "n_valid", "n_rejected", "rejected_by_reason")}
        | ({"n_encoded": stages["encode"]["n_encoded"]} if "encode" in stages else {}),
    }
    if until == "select":
        encoded = stages["encode"]
        base = {k: manifest[k] for k in ("config", "versions", "model", "counts")} | {
            "sae": encoded["sae"], "layer": encoded["layer"],
            "fingerprints": {"prepare": prepared["fingerprint"], "encode": encoded["fingerprint"]}}
        stages["select"] = run_select(cfg, storage, base, tau)
    if until == "fac":
        stages["fac"] = measure_fac(cfg, storage, tau)
    if until == "synthesize":
        stages["synthesis"] = run_synthesis(cfg, storage, tau)
    manifest["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    storage.write_json("manifest.json", manifest)
    log.info("run: done; manifest at %s", storage.uri("manifest.json"))
    return manifest


def run_train_sae(cfg: RunConfig, storage: Storage) -> dict:
    """Train the default SAE on the prepared texts: enough of them for the token budget."""
    texts, tokens = [], 0
    table = pq.read_table(storage.path("prepared"), columns=["text", "n_tokens"], filesystem=storage.fs)
    for text, n in zip(table["text"].to_pylist(), table["n_tokens"].to_pylist()):
        if tokens >= 2 * cfg.train_sae.training_tokens:
            break
        texts.append(text)
        tokens += n
    summary = train_sae(cfg, texts, resolve_device(cfg.encode.device))
    storage.write_json("stages/train_sae.json", summary)
    return summary


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
