"""The task methods' driver: encode the target examples into a store of their own
(under <output.root>/targets/, with the same model, SAE and markers, so a re-run
reuses it), then rank the pool with MONA or IGDS in one streaming pass."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysel.config import RunConfig
from raysel.encode import feature_paths, read_features, run_encode
from raysel.igds import feature_effects, frequency_recall, resonant_scores
from raysel.models import load_tokenizer
from raysel.mona import distributed_top_k, mona_scores, prototype
from raysel.prepare import run_prepare
from raysel.records import chat_template_for
from raysel.storage import Storage

log = logging.getLogger(__name__)


def target_store(cfg: RunConfig, storage: Storage) -> Storage:
    """Prepare and encode task.targets under <root>/targets (skipped when already done)."""
    tcfg = cfg.model_copy(update={
        "input": cfg.input.model_copy(update={"paths": list(cfg.task.targets), "hf_dataset": None}),
        "output": cfg.output.model_copy(update={"root": storage.uri("targets")}),
    })
    targets = Storage(tcfg.output.root, cfg.s3)
    encoded = run_encode(tcfg, targets, run_prepare(tcfg, targets))
    log.info("task: %d target examples encoded", encoded["n_encoded"])
    return targets


def read_store(storage: Storage) -> pa.Table:
    return pq.ParquetDataset(feature_paths(storage), filesystem=storage.fs).read().sort_by("id")


def held_out(ids: list[str], fraction: float, seed: int) -> set[str]:
    """The targets kept back for measuring interventions; the rest are for frequency recall."""
    if len(ids) < 2:
        raise ValueError(f"task.targets: IGDS needs at least 2 target examples, got {len(ids)}")
    order = np.random.default_rng(seed).permutation(sorted(ids))
    n_dev = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return set(order[:n_dev].tolist())


def dev_pairs(cfg: RunConfig, targets: Storage, dev: set[str]) -> tuple[list[str], list[str]]:
    """(prompt rendered up to the assistant's turn, reference answer) of each held-out target."""
    table = pq.read_table(targets.path("prepared"), columns=["id", "messages"], filesystem=targets.fs)
    tokenizer = load_tokenizer(cfg.model)
    template = chat_template_for(tokenizer, cfg.prepare.chat_template)
    prompts, answers = [], []
    for i, messages in sorted(zip(table["id"].to_pylist(), table["messages"].to_pylist()), key=lambda r: r[0]):
        if i in dev and messages and messages[-1]["role"] == "assistant" and len(messages) > 1:
            prompts.append(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True,
                                                         chat_template=template))
            answers.append(messages[-1]["content"])
    if not prompts:
        raise ValueError("task.targets: IGDS needs targets with an answer (an assistant turn or an output field)")
    return prompts, answers


def mona(cfg: RunConfig, storage: Storage, targets: Storage, d_sae: int, k: int) -> tuple[pa.Table, dict]:
    p = prototype(read_store(targets), d_sae, cfg.mona.pooling)
    top = distributed_top_k(read_features(storage), lambda t: mona_scores(t, p, cfg.mona), k)
    return top, {"prototype_active_features": int(np.count_nonzero(p))}


def igds(cfg: RunConfig, storage: Storage, targets: Storage, tau: float, k: int) -> tuple[pa.Table, dict]:
    store = read_store(targets)
    dev = held_out(store["id"].to_pylist(), cfg.task.dev_fraction, cfg.task.seed)
    fit = store.filter(pc.invert(pc.is_in(store["id"], pa.array(sorted(dev), pa.string()))))
    stats = pq.read_table(storage.path("stats", "features.parquet"), columns=["doc_freq", "max"], filesystem=storage.fs)
    n_pool = storage.read_json("stats/summary.json")["n_samples"]
    candidates = frequency_recall(fit, tau, stats["doc_freq"].to_numpy(), n_pool, cfg.igds.candidates)
    prompts, answers = dev_pairs(cfg, targets, dev)
    feature_max = dict(enumerate(stats["max"].to_numpy().tolist()))
    log.info("igds: %d candidate features from %d targets; measuring each on %d held-out targets (%s)",
             candidates.num_rows, fit.num_rows, len(prompts), cfg.igds.metric)
    effects = feature_effects(cfg, candidates["feature"].to_pylist(), prompts, answers, feature_max,
                              storage.read_json("stages/encode.json")["layer"])
    helpful = [r["feature"] for r in effects.to_pylist() if r["delta"] > 0][: cfg.igds.keep]
    if not helpful:
        log.warning("igds: no candidate feature raised the task metric; scoring with the best %d anyway", cfg.igds.keep)
    task_features = helpful or effects["feature"].to_pylist()[: cfg.igds.keep]
    log.info("igds: task features %s", task_features)
    top = distributed_top_k(read_features(storage),
                            lambda t: resonant_scores(t, np.array(task_features), cfg.igds.pooling), k)
    recall = {r["feature"]: r for r in candidates.to_pylist()}
    return top, {"task_features": task_features, "any_positive_delta": bool(helpful),
                 "feature_effects": [r | recall[r["feature"]] for r in effects.to_pylist()]}
