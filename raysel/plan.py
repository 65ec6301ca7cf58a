"""`--dry-run`: what a run would do, from its config and what its root already holds. It writes
nothing and runs no model: the input files and their sizes, each stage of the plan to run or to
skip (by the key the stage itself gives), the encode shards to do and to skip, each actor pool's
resources, the side sets, and the model/SAE checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from raysel.config import RunConfig
from raysel.core import paths
from raysel.core.features import FeatureStore
from raysel.core.models import EMBEDDED_MODEL, embedded_dir
from raysel.core.sae import check_against_model, default_sae_location, sae_metadata
from raysel.core.section import ConfigError
from raysel.core.storage import Storage
from raysel.methods import build as build_method
from raysel.pipeline import SideSets, Target, build
from raysel.stages.base import Stage, closure, committed
from raysel.stages.encode import Encode, differing
from raysel.stages.prepare import Prepare, held_input
from raysel.stages.select import Select
from raysel.stages.train_sae import TrainSAE


def dry_run(cfg: RunConfig, targets: list[str]) -> dict:
    """Each stage the targets need, in plan order: skipped when its marker holds the key it would have
    now (asked of the stage itself, from the records of what it needs), else run."""
    storage = Storage(cfg.output.root, cfg.s3)
    storage.check()
    stages = build(Target(cfg, storage, SideSets(cfg, storage), run={"config": cfg.public_dict()}))
    prepare = stages[0]
    known: dict[str, dict] = {}
    planned = {}
    for stage in closure(stages, targets):
        planned[stage.name] = stage_plan(stage, storage, known) | details(cfg, storage, stage, known)
    files = [{"path": f.path, "format": f.format, "bytes": f.size} for f in prepare.files]
    return {
        "root": storage.uri(),
        "root_note": root_note(storage, prepare),
        "input_files": files,
        "input_bytes": sum(f["bytes"] for f in files),
        "checks": model_checks(cfg) if "encode" in planned else {},
        "stages": planned,
    }


def stage_plan(stage: Stage, storage: Storage, known: dict[str, dict]) -> dict:
    """Run or skip, from the stage's own key; `known` gathers the records of the stages found done."""
    side = stage.side_sets()
    waiting = [n for n in stage.needs if n not in known] + sorted(side)
    if waiting:
        return {"action": f"run after {', '.join(waiting)}, unless its key then matches"}
    try:
        key = stage.key({n: known[n] for n in stage.needs})
    except (ConfigError, OSError) as err:
        return {"action": f"run (its key is unknown yet: {err})"}
    if key is None:
        return {"action": "run (always)"}
    done = committed(storage, paths.marker(stage.name), key)
    if done is None:
        return {"action": "run"}
    known[stage.name] = done
    return {"action": "skip (up to date)"}


def details(cfg: RunConfig, storage: Storage, stage: Stage, known: dict[str, dict]) -> dict:
    """What a person checks before a run: resources, the encode shards left, the methods, the side sets."""
    out = resources(stage.resources()) if stage.resources() else {}
    if stage.side_sets():
        out["side_sets"] = {name: ", ".join(p) for name, p in stage.side_sets().items()}
    if isinstance(stage, Encode):
        out |= encode_shards(storage, stage, known.get("prepare"))
    if isinstance(stage, TrainSAE):
        out["sae"] = default_sae_location(cfg.stack())
    if isinstance(stage, Select):
        out["methods"] = select_methods(cfg)
    return out


def resources(r) -> dict:
    return {"resources": {k: v for k, v in dataclasses.asdict(r).items() if v not in (None, 0, 0.0)}}


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


def encode_shards(storage: Storage, encode: Encode, prepared: dict | None) -> dict:
    if prepared is None:
        return {"shards": "all: prepare runs first"}
    try:
        parts = encode.parts(prepared)
    except (ConfigError, OSError) as err:
        return {"shards": f"unknown: {err}"}
    names = sorted(i.path.rsplit("/", 1)[1] for i in storage.listing(paths.PREPARED) if i.path.endswith(".parquet"))
    markers = FeatureStore(storage).done_shards()
    done = {n for n, m in markers.items() if m.get("key") == {"fingerprint": encode.fingerprint(prepared)}}
    todo = [n for n in names if n not in done]
    out = {"shards_to_do": len(todo), "shards_to_skip": len(names) - len(todo), "samples": prepared.get("n_valid")}
    stale = [m for n, m in markers.items() if n not in done]
    if stale:
        out["shards_of_another_config"] = (f"{len(stale)}, under another {', '.join(differing(stale[0], parts))}: "
                                           f"the run stops unless --force")  # fmt: skip
    return out


def select_methods(cfg: RunConfig) -> dict:
    """The methods with their budgets and side inputs."""
    methods = {}
    for entry in cfg.select.methods:
        method = build_method(entry)
        methods[method.name] = {"budget": entry.budget or cfg.select.budget, "side_inputs": method.side_inputs(cfg.fac)}
    return methods


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
    if key == "side_sets":
        return "side sets " + "; ".join(f"{n} ({p})" for n, p in value.items())
    if key == "methods":
        return "methods " + ", ".join(
            f"{m} (budget {v['budget']:g}"
            + "".join(f"; {n}: {', '.join(p)}" for n, p in v["side_inputs"].items() if p)
            + ")"
            for m, v in value.items()
        )
    return f"{key.replace('_', ' ')} {value}"
