"""The drivers of everything measured against a side set of examples: the task
methods (MONA, IGDS: task.targets) and FAC (fac.anchor). Each side set is
encoded into a store of its own under <output.root>/<name>/, with the run's
model, SAE and markers, so a re-run reuses it."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysel.config import RunConfig
from raysel.encode import feature_paths, read_features, run_encode
from raysel.fac import fac, fac_greedy, task_features
from raysel.igds import feature_effects, frequency_recall, resonant_scores
from raysel.judge import judge_features, kept
from raysel.models import load_tokenizer
from raysel.mona import distributed_top_k, mona_scores, prototype
from raysel.prepare import run_prepare
from raysel.records import chat_template_for
from raysel.results import write_selection
from raysel.spans import run_spans
from raysel.stats import run_stats
from raysel.storage import Storage
from raysel.synthesis import acceptance, check_vllm, synthesize

log = logging.getLogger(__name__)


def example_store(cfg: RunConfig, storage: Storage, paths: list[str], name: str, tau: float | None = None) -> Storage:
    """Prepare and encode a side set of examples (targets, an anchor) under <root>/<name>, with the run's
    model and SAE; with `tau`, its statistics too. Finished stages are skipped, as in a run."""
    sub = cfg.model_copy(update={
        "input": cfg.input.model_copy(update={"paths": list(paths), "hf_dataset": None}),
        "output": cfg.output.model_copy(update={"root": storage.uri(name)}),
    })
    store = Storage(sub.output.root, cfg.s3)
    encoded = run_encode(sub, store, run_prepare(sub, store))
    if tau is not None:
        run_stats(store, read_features(store), encoded["d_sae"], tau, cfg.stats.top_n, encoded["fingerprint"])
    log.info("%s: %d examples encoded", name, encoded["n_encoded"])
    return store


def target_store(cfg: RunConfig, storage: Storage) -> Storage:
    return example_store(cfg, storage, cfg.task.targets, "targets")


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


def feature_source(cfg: RunConfig) -> str:
    if cfg.fac.features:
        return "list"
    shortlist = f"the {cfg.fac.n_features} most enriched on the anchor"
    return f"{shortlist}, judged by an LLM ({cfg.fac.judge_keep} or better)" if cfg.fac.judge_task else shortlist


def anchor_spans(cfg: RunConfig, anchor: Storage, features: list[int]) -> pa.Table:
    return run_spans(cfg, anchor, anchor.read_json("stages/encode.json")["fingerprint"], features)


def fac_features(cfg: RunConfig, storage: Storage, anchor: Storage, anchored: pa.Table, pool: pa.Table, tau: float,
                 d_sae: int) -> np.ndarray:
    """F: fac.features; else the fac.n_features most enriched on the anchor over the pool; with
    fac.judge_task, those of them an LLM judge finds relevant (fac/judged.parquet holds every verdict)."""
    features = task_features(anchored, pool, tau, d_sae, cfg.fac.features, cfg.fac.n_features)
    if not cfg.fac.judge_task:
        return features
    start = time.time()
    verdicts = judge_features(cfg, anchor_spans(cfg, anchor, features.tolist()), features.tolist())
    storage.fs.create_dir(storage.path("fac"), recursive=True)
    pq.write_table(verdicts, storage.path("fac", "judged.parquet"), filesystem=storage.fs)
    chosen = kept(verdicts, cfg.fac.judge_keep)
    if not chosen:
        log.warning("fac: the judge kept none of the %d features, so F is empty and FAC means nothing; see its "
                    "verdicts in fac/judged.parquet, and try a stronger fac.judge_generator or fac.judge_keep: maybe",
                    len(features))
    log.info("fac: the judge kept %d of %d enriched features as relevant to %r (%s or better) in %.0fs", len(chosen),
             len(features), cfg.fac.judge_task, cfg.fac.judge_keep, time.time() - start)
    return np.array(chosen, dtype=np.int64)


def measure_fac(cfg: RunConfig, storage: Storage, tau: float) -> dict:
    """`raysel fac`: FAC of the run's input against fac.anchor, with the missing features' spans.
    Writes fac/features.parquet, fac/missing_spans.parquet and, last, fac/report.json."""
    anchor = example_store(cfg, storage, cfg.fac.anchor, "anchor", tau)
    d_sae = storage.read_json("stats/summary.json")["d_sae"]
    anchored, evaluated = read_store(anchor), read_store(storage)
    features = fac_features(cfg, storage, anchor, anchored, evaluated, tau, d_sae)
    summary, table = fac(anchored, evaluated, features, tau, d_sae)
    spans = anchor_spans(cfg, anchor, summary["missing"])
    storage.remove("fac/report.json")
    storage.fs.create_dir(storage.path("fac"), recursive=True)
    pq.write_table(table, storage.path("fac", "features.parquet"), filesystem=storage.fs)
    pq.write_table(spans, storage.path("fac", "missing_spans.parquet"), filesystem=storage.fs)
    report = {**summary, "tau": tau, "n_anchor": anchored.num_rows, "n_evaluated": evaluated.num_rows,
              "feature_source": feature_source(cfg),
              "missing_examples": {str(j): [{"id": r["id"], "value": r["value"], "text": "".join(r["tokens"])}
                                            for r in spans.filter(pc.equal(spans["feature"], j)).to_pylist()[:3]]
                                   for j in summary["missing"]}}
    storage.write_json("fac/report.json", report)
    log.info("fac: %.3f (%d of %d anchor features; frequency-weighted %.3f, magnitude-weighted %.3f); %d missing",
             summary["fac"], summary["n_covered"], summary["n_in_anchor"], summary["fac_frequency"],
             summary["fac_magnitude"], len(summary["missing"]))
    return {k: v for k, v in report.items() if k != "missing_examples"}


def fac_select(cfg: RunConfig, storage: Storage, tau: float, d_sae: int, k: int) -> tuple[list[str], list[int], dict]:
    """`method: fac`: pool samples covering the anchor features that fac.evaluated (or nothing) misses."""
    anchor = example_store(cfg, storage, cfg.fac.anchor, "anchor", tau)
    anchored, pool = read_store(anchor), read_store(storage)
    have = read_store(example_store(cfg, storage, cfg.fac.evaluated, "evaluated")) if cfg.fac.evaluated else pool.slice(0, 0)
    features = fac_features(cfg, storage, anchor, anchored, pool, tau, d_sae)
    before, _ = fac(anchored, have, features, tau, d_sae)
    order, added = fac_greedy(pool, np.array(before["missing"], dtype=np.int64), tau, k)

    def fac_with(ids: list[str]) -> float:
        picked = pool.filter(pc.is_in(pool["id"], pa.array(ids, pa.string())))
        return fac(anchored, pa.concat_tables([have, picked]), features, tau, d_sae)[0]["fac"]

    random_ids = np.asarray(pool["id"].to_pylist(), dtype=object)[
        np.random.default_rng(cfg.select.seed).permutation(pool.num_rows)[:k]].tolist()
    settled = {"fac_features": int(features.size), "fac_in_anchor": before["n_in_anchor"],
               "fac_missing_before": len(before["missing"]), "fac_before": before["fac"],
               "fac_after": fac_with(order), "fac_random_after": fac_with(random_ids), "fac_pool": fac_with(pool["id"].to_pylist())}
    log.info("fac: FAC %.3f before, %.3f after %d picks (random picks: %.3f; the whole pool: %.3f)",
             settled["fac_before"], settled["fac_after"], len(order), settled["fac_random_after"], settled["fac_pool"])
    return order, added, settled


def synth_delta(cfg: RunConfig, tau: float) -> float:
    """synth.delta, or the run's tau as resolved (calibrated, when activation.target_active sets it)."""
    return tau if cfg.synth.delta is None else cfg.synth.delta


def run_synthesis(cfg: RunConfig, storage: Storage, tau: float) -> dict:
    """`raysel synthesize`: FAC of the input, then new samples for its missing features, written like a
    selection under selection/synthesis/ (records carry their provenance), with FAC before and after."""
    start = time.time()
    if cfg.synth.engine == "vllm":
        check_vllm()
    before = measure_fac(cfg, storage, tau)
    spans = pq.read_table(storage.path("fac", "missing_spans.parquet"), filesystem=storage.fs)
    delta = synth_delta(cfg, tau)
    candidates = synthesize(cfg, before["missing"], spans, delta)
    kept = candidates.filter(candidates["kept"])
    anchored = read_store(Storage(storage.uri("anchor"), cfg.s3))
    features = pq.read_table(storage.path("fac", "features.parquet"), columns=["feature"],
                             filesystem=storage.fs)["feature"].to_numpy()
    d_sae = storage.read_json("stats/summary.json")["d_sae"]
    evaluated = read_store(storage)
    grown = pa.concat_tables([evaluated, kept.select(evaluated.column_names).cast(evaluated.schema)])
    after, _ = fac(anchored, grown, features, tau, d_sae)
    storage.fs.create_dir(storage.path("synthesis"), recursive=True)
    pq.write_table(candidates.drop_columns(["feat_ids", "feat_max", "feat_sum", "n_tokens"]),
                   storage.path("synthesis", "candidates.parquet"), filesystem=storage.fs)
    seconds = time.time() - start
    summary = {"delta": delta, "fac_before": before["fac"], "fac_after": after["fac"],
               "missing_before": len(before["missing"]),
               "missing_after": len(after["missing"]), "features_tried": len(set(candidates["feature"].to_pylist())),
               **acceptance(candidates), "seconds": round(seconds, 1),
               "seconds_per_kept": round(seconds / kept.num_rows, 1) if kept.num_rows else None}
    records = {r["id"]: json.dumps(json.loads(r["record"]) | {"provenance": {
        k: r[k] for k in ("feature", "step", "prompt", "score", "generator")}}) for r in kept.to_pylist()}
    write_selection(storage, "synthesis", kept["id"].to_pylist(), kept["score"].to_numpy(),
                    np.zeros(kept.num_rows, np.int64), records,
                    {"config": cfg.public_dict(), "method": "synthesis", "tau": tau, **summary,
                     "counts": {"n_selected": kept.num_rows}})
    log.info("synthesis: FAC %.3f -> %.3f; %d of %d step-2 candidates above delta (%.0f %%), %d kept, %.1fs",
             summary["fac_before"], summary["fac_after"], round(summary["acceptance_rate"] * cfg.synth.n_contrastive
             * summary["features_tried"]), cfg.synth.n_contrastive * summary["features_tried"],
             100 * summary["acceptance_rate"], kept.num_rows, seconds)
    return summary
