"""The whole job, as one map: the run's input and every side set (targets, an anchor, an
evaluated set) go through the same `encode_set`: prepare -> (train-sae) -> encode -> stats; then
the verb's last stage (select, fac or synthesize) runs on the input's store, asking for side
sets as it needs them. Each stage commits through stages/base.py, so finished ones are skipped
and the run manifest is written last.

    input ──► prepare ─► [train_sae] ─► encode ─► stats ─┬─► select (methods/) ─► selection/<method>/
                                                          ├─► fac ─► fac/
    targets/anchor/evaluated ──► encode_set (same path) ──┘   └─► synthesize ─► selection/synthesis/
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging

from raysel.config import InputConfig, RunConfig
from raysel.core import paths
from raysel.core.corpus import list_input_files
from raysel.core.features import FeatureStore
from raysel.core.ray_adapter import init_ray
from raysel.core.sae import WEIGHTS, default_sae_dir
from raysel.core.storage import Storage, StorageError, redact
from raysel.methods import Context
from raysel.stages.base import execute
from raysel.stages.encode import Encode
from raysel.stages.fac import MeasureFAC
from raysel.stages.prepare import Prepare, check_root
from raysel.stages.select import Select
from raysel.stages.stats import Calibrate, Stats
from raysel.stages.synthesize import Synthesize, check_vllm
from raysel.stages.train_sae import TrainSAE

log = logging.getLogger(__name__)

PACKAGES = ("raysel", "ray", "torch", "transformers", "sae-lens", "datasets", "pyarrow", "numpy")


def run(cfg: RunConfig, until: str = "select", train_missing_sae: bool = False, force: bool = False) -> dict:
    """Run the stages up to `until`; finished ones are skipped. A root holding a run of other input
    files is refused unless `force`."""
    storage = Storage(cfg.output.root, cfg.s3)
    storage.check()
    check_root(storage, [f.path for f in list_input_files(cfg.input, cfg.s3)[1]], force)
    init_ray(cfg.ray)
    try:
        return run_stages(cfg, storage, until, train_missing_sae)
    except OSError as err:
        if "AWS Error" not in str(err):
            raise
        raise StorageError(
            f"output root {storage.root}: {redact(str(err), cfg.s3)}; finished work is committed, re-run to resume"
        ) from None


def encode_set(
    cfg: RunConfig,
    storage: Storage,
    input: InputConfig,
    until: str = "stats",
    tau: float | None = None,
    train_sae: bool = False,
) -> dict:
    """One set of samples through prepare, encode and stats under `storage`: the run's input, or a
    side set at <root>/<name>/ (then with the input's tau, so activation means the same in both, and
    known by its content: side sets are small and edited in place)."""
    stack = cfg.stack()
    side = tau is not None
    stages = {"prepare": execute(Prepare(input, cfg.prepare, cfg.model, cfg.s3, storage, by_content=side))}
    if train_sae:
        stages["train_sae"] = execute(TrainSAE(stack, storage))
    if until == "train-sae":
        return stages
    stages["encode"] = execute(Encode(stack, storage, stages["prepare"]))
    if until == "encode":
        return stages
    if tau is None:
        stages["tau"] = execute(Calibrate(storage, stages["encode"], cfg.activation))
        tau = stages["tau"]["tau"]
    stages["stats"] = execute(Stats(storage, stages["encode"], tau, cfg.stats.top_n))
    return stages


def run_stages(cfg: RunConfig, storage: Storage, until: str, train_missing_sae: bool) -> dict:
    log.info("run: output at %s", storage.uri())
    if until == "synthesize" and cfg.synth.engine == "vllm":
        check_vllm()  # before any work
    default_missing = (
        cfg.sae.path is None and not cfg.sae.release and not (default_sae_dir(cfg.stack()) / WEIGHTS).is_file()
    )
    stages = encode_set(
        cfg, storage, cfg.input, until, train_sae=until == "train-sae" or (train_missing_sae and default_missing)
    )
    prepared = stages["prepare"]
    manifest = {
        "config": cfg.public_dict(),
        "versions": versions(),
        "output": storage.uri(),
        "model": cfg.model.name,
        "stages": stages,
        "counts": {k: prepared[k] for k in ("n_input", "n_blank_lines", "n_valid", "n_rejected", "rejected_by_reason")}
        | ({k: stages["encode"][k] for k in ("n_encoded", "n_encode_rejected")} if "encode" in stages else {}),
    }
    if until in ("select", "fac", "synthesize"):
        ctx = context(cfg, storage, stages["stats"])
    if until == "select":
        stages["select"] = execute(Select(cfg.select, cfg.s3, ctx, stages["encode"], selection_base(manifest)))
    if until in ("fac", "synthesize"):
        stages["fac"] = execute(MeasureFAC(ctx, cfg.stats.top_n))
    if until == "synthesize":
        stages["synthesis"] = execute(Synthesize(cfg.synth, ctx, stages["fac"], cfg.public_dict()))
    manifest["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    storage.write_json(paths.MANIFEST, manifest)
    log.info("run: done; manifest at %s", storage.uri(paths.MANIFEST))
    return manifest


def selection_base(manifest: dict) -> dict:
    """What every selection's manifest carries of the run's: config, versions, model, SAE, counts, fingerprints."""
    prepared, encoded = manifest["stages"]["prepare"], manifest["stages"]["encode"]
    return {k: manifest[k] for k in ("config", "versions", "model", "counts")} | {
        "sae": encoded["sae"],
        "layer": encoded["layer"],
        "fingerprints": {"prepare": prepared["fingerprint"], "encode": encoded["fingerprint"]},
    }


def context(cfg: RunConfig, storage: Storage, stats: dict) -> Context:
    """What the last stages share: the run's tau and width, the model stack, and side sets on demand."""
    encoded: dict[tuple, FeatureStore] = {}

    def side_set(name: str, paths_: list[str]) -> FeatureStore:
        if (name, tuple(paths_)) not in encoded:
            sub = Storage(storage.uri(name), cfg.s3)
            side = cfg.input.model_copy(update={"paths": list(paths_), "hf_dataset": None})  # read like the input
            stages = encode_set(cfg, sub, side, tau=stats["tau"])
            log.info("%s: %d examples encoded", name, stages["encode"]["n_encoded"])
            encoded[(name, tuple(paths_))] = FeatureStore(sub)
        return encoded[(name, tuple(paths_))]

    return Context(
        tau=stats["tau"],
        seed=cfg.select.seed,
        d_sae=stats["d_sae"],
        storage=storage,
        stack=cfg.stack(),
        fac=cfg.fac,
        side_set=side_set,
    )


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
