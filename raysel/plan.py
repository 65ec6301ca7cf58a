"""`--dry-run`: what a run would do, from its config and what its root already holds. It writes
nothing and runs no model: the input files and their sizes, each stage to run or to skip, the
encode shards to do and to skip, each actor pool's resources, and the model/SAE checks."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from raysel.config import RunConfig
from raysel.core import paths
from raysel.core.features import FeatureStore
from raysel.core.models import EMBEDDED_MODEL, embedded_dir
from raysel.core.ray_adapter import model_resources
from raysel.core.sae import check_against_model, default_sae_dir, sae_metadata
from raysel.core.section import ConfigError
from raysel.core.storage import Storage
from raysel.methods import Context, build
from raysel.stages.base import committed
from raysel.stages.encode import Encode
from raysel.stages.prepare import Prepare, held_input

LAST_STAGES = {"select": ["select"], "fac": ["fac"], "synthesize": ["fac", "synthesis"]}


def dry_run(cfg: RunConfig, until: str) -> dict:
    storage = Storage(cfg.output.root, cfg.s3)
    storage.check()
    prepare = Prepare(cfg.input, cfg.prepare, cfg.model, cfg.s3, storage)
    prepared = committed(storage, paths.marker("prepare"), prepare.key())
    stages = {"prepare": {"action": "skip (up to date)" if prepared else "run", **resources(prepare.resources())}}
    checks = {}
    if until == "train-sae":
        stages["train_sae"] = {"action": "run", "sae": str(default_sae_dir(cfg.stack()))}
    else:
        checks = model_checks(cfg)
        stages["encode"] = encode_plan(cfg, storage, prepared, gpus=cluster_has_gpus(cfg))
    if until not in ("train-sae", "encode"):
        stages["tau"] = {"action": "run after encode, unless its marker matches"}
        stages["stats"] = {"action": "run after encode, unless its marker matches"}
    for name in LAST_STAGES.get(until, []):
        stages[name] = last_stage_plan(cfg, storage, name)
    files = [{"path": f.path, "format": f.format, "bytes": f.size} for f in prepare.files]
    return {
        "root": storage.uri(),
        "root_note": root_note(storage, prepare),
        "input_files": files,
        "input_bytes": sum(f["bytes"] for f in files),
        "checks": checks,
        "stages": stages,
    }


def resources(r) -> dict:
    return {"resources": {k: v for k, v in dataclasses.asdict(r).items() if v not in (None, 0, 0.0)}}


def cluster_has_gpus(cfg: RunConfig) -> bool:
    """The cluster the run would join: the one at ray.address / RAY_ADDRESS (joined read-only), or this machine."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        import ray

        ray.init(address=cfg.ray.address or os.environ["RAY_ADDRESS"], log_to_driver=False)
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


def model_checks(cfg: RunConfig) -> dict:
    """The SAE's width, layer and identity, and whether they fit the model, read from config files only."""
    stack = cfg.stack()
    try:
        meta = sae_metadata(stack)
    except (ConfigError, OSError) as err:  # a default SAE not yet trained has no config to read
        return {"sae": f"not checked: {err}"}
    converted = embedded_dir(Path(cfg.model.cache_dir).expanduser()) / "model.safetensors"
    if cfg.model.name == EMBEDDED_MODEL and not converted.is_file():
        return {**meta, "model": "the embedded model is converted on first use; checked then"}
    try:
        check_against_model(stack, meta)
    except ConfigError as err:
        return {**meta, "model": f"MISMATCH: {err}"}
    return {**meta, "model": "ok: the SAE's d_in and layer fit the model"}


def encode_plan(cfg: RunConfig, storage: Storage, prepared: dict | None, gpus: bool) -> dict:
    pool = {"action": "run", **resources(model_resources(cfg.encode, cfg.encode.actors, has_gpus=gpus))}
    if prepared is None:
        return {**pool, "shards": "all: prepare runs first"}
    try:
        fingerprint = Encode(cfg.stack(), storage, prepared, has_gpus=gpus).fingerprint
    except (ConfigError, OSError) as err:
        return {**pool, "shards": f"unknown: {err}"}
    names = sorted(i.path.rsplit("/", 1)[1] for i in storage.listing(paths.PREPARED) if i.path.endswith(".parquet"))
    done = {n for n, m in FeatureStore(storage).done_shards().items() if m.get("key") == {"fingerprint": fingerprint}}
    todo = [n for n in names if n not in done]
    return {**pool, "action": "run" if todo else "skip (every shard done)", "shards_to_do": len(todo),
            "shards_to_skip": len(names) - len(todo), "samples": prepared.get("n_valid")}  # fmt: skip


def last_stage_plan(cfg: RunConfig, storage: Storage, name: str) -> dict:
    """The methods with their budgets and side inputs (select), or the anchor (fac, synthesis)."""
    if name != "select":
        return {"action": "run", "anchor": cfg.fac.anchor}
    ctx = Context(0.0, cfg.select.seed, 0, storage, cfg.stack(), cfg.fac, None)
    methods = {}
    for entry in cfg.select.methods:
        method = build(entry)
        methods[method.name] = {"budget": entry.budget or cfg.select.budget, "side_inputs": method.side_inputs(ctx)}
    return {"action": "run", "methods": methods}


def root_note(storage: Storage, prepare: Prepare) -> str:
    held = held_input(storage)
    if held is None:
        return "empty: a new run"
    if held == sorted(f.path for f in prepare.files):
        return "holds a run of this input: finished stages are skipped"
    return f"REFUSED without --force: it holds a run of another input ({', '.join(held[:3])})"


def plan_lines(plan: dict) -> list[str]:
    lines = [f"raysel dry run: nothing written. Output {plan['root']}: {plan['root_note']}"]
    lines.append(f"  input     {len(plan['input_files'])} file(s), {plan['input_bytes']:,} bytes")
    lines += [f"    {f['path']} ({f['format']}, {f['bytes']:,} bytes)" for f in plan["input_files"][:20]]
    if len(plan["input_files"]) > 20:
        lines.append(f"    ... and {len(plan['input_files']) - 20} more")
    if plan["checks"]:
        lines.append("  checks    " + ", ".join(f"{k} {v}" for k, v in plan["checks"].items()))
    for name, stage in plan["stages"].items():
        rest = [shown(k, v) for k, v in stage.items() if k != "action"]
        lines.append(f"  {name:<9} {stage['action']}" + (f"; {'; '.join(rest)}" if rest else ""))
    return lines


def shown(key: str, value) -> str:
    if key == "resources":
        r = value
        pool = f"{r['actors']} actor(s)" if r.get("actors") else "tasks"
        memory = f", {r['memory'] / 2**30:.1f} GiB" if r.get("memory") else ""
        return f"{pool} of {r.get('num_cpus', 0):g} CPU, {r.get('num_gpus', 0):g} GPU{memory} each, batch {r['batch_size']}"
    if key == "methods":
        return "methods " + ", ".join(
            f"{m} (budget {v['budget']:g}"
            + "".join(f"; {n}: {', '.join(p)}" for n, p in v["side_inputs"].items() if p)
            + ")"
            for m, v in value.items()
        )
    return f"{key.replace('_', ' ')} {value}"
