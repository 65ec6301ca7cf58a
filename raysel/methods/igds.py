"""IGDS: find the SAE features that causally help the target task, then score pool
samples by how strongly they carry those features.

1. Frequency recall: rank features by (share of target examples activating
   them) - (share of pool samples activating them); keep the top N.
2. Interventional filtering: for each candidate j, add alpha * max_j * W_dec[j]
   to the residual stream after the SAE's hook layer, on every counted token,
   in a full-model forward pass, and measure the change of the task metric on
   held-out targets: delta_j = metric(amplified) - metric(base). The metric is
   the mean log-likelihood of the reference answers, or exact match of the final
   number by greedy generation. Candidates are spread over a Ray actor pool.
3. Feature-resonant score: FRS(x) = sum over the kept features of s(x)_j (the
   sum-pool); the top fraction of the pool is selected.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from pydantic import Field

from raysel.core import paths
from raysel.core.features import activated_entries, pooled
from raysel.core.models import load_model, load_tokenizer, resolve_device, tokenize
from raysel.core.ray_adapter import map_stage, model_resources
from raysel.core.records import chat_template_for, shared_prefix
from raysel.core.sae import load_sae
from raysel.methods.base import Context, Method, MethodConfig, Picks, Pool

if TYPE_CHECKING:
    from raysel.config import ModelStack
    from raysel.core.storage import Storage

log = logging.getLogger(__name__)


class IGDSConfig(MethodConfig):
    name: Literal["igds"] = "igds"
    targets: list[str] = Field(min_length=1)  # files, globs or s3:// paths of target-task examples, read like the input
    dev_fraction: float = Field(
        0.5, gt=0, lt=1
    )  # the held-out share of the targets, on which interventions are measured
    seed: int = 0  # which targets are held out
    candidates: int = Field(50, gt=0)  # N features kept by frequency recall (target share minus pool share)
    alpha: float = Field(4.0, gt=0)  # amplification: h += alpha * max activation * decoder direction
    keep: int = Field(3, gt=0)  # task features: the top ones by delta, among those with delta > 0
    metric: Literal["loglik", "exact_match"] = "loglik"  # exact_match generates and compares the final number
    pooling: Literal["sum", "mean"] = "sum"  # of the feature-resonant score
    budget: float = Field(0.5, gt=0)  # a count or a fraction, as select.budget; the paper keeps 50 %
    actors: int = Field(1, gt=0)  # full models evaluating candidate features in parallel
    batch_size: int = Field(8, gt=0)  # dev examples per forward pass
    max_new_tokens: int = Field(256, gt=0)  # exact_match: generation length


class IGDS(Method):
    Config = IGDSConfig
    ranks_by_score = True

    def side_inputs(self, ctx: Context) -> dict[str, list[str]]:
        return {"targets": self.cfg.targets}

    def pick(self, pool: Pool, k: int, ctx: Context) -> Picks:
        cfg = self.cfg
        targets = ctx.side_set("targets", cfg.targets)
        store = targets.table()
        dev = held_out(store["id"].to_pylist(), cfg.dev_fraction, cfg.seed)
        fit = store.filter(pc.invert(pc.is_in(store["id"], pa.array(sorted(dev), pa.string()))))
        stats = pq.read_table(
            ctx.storage.path(paths.FEATURE_STATS), columns=["doc_freq", "max"], filesystem=ctx.storage.fs
        )
        candidates = frequency_recall(fit, ctx.tau, stats["doc_freq"].to_numpy(), len(pool.ids), cfg.candidates)
        prompts, answers = dev_pairs(ctx.stack, targets.storage, dev)
        feature_max = dict(enumerate(stats["max"].to_numpy().tolist()))
        log.info(
            "igds: %d candidate features from %d targets; measuring each on %d held-out targets (%s)",
            candidates.num_rows,
            fit.num_rows,
            len(prompts),
            cfg.metric,
        )
        layer = ctx.storage.read_json(paths.marker("encode"))["layer"]
        effects = feature_effects(
            ctx.stack, cfg, candidates["feature"].to_pylist(), prompts, answers, feature_max, layer
        )
        helpful = [r["feature"] for r in effects.to_pylist() if r["delta"] > 0][: cfg.keep]
        if not helpful:
            log.warning("igds: no candidate feature raised the task metric; scoring with the best %d anyway", cfg.keep)
        task_features = helpful or effects["feature"].to_pylist()[: cfg.keep]
        log.info("igds: task features %s", task_features)
        top = pool.store.top_k(lambda t: resonant_scores(t, np.array(task_features), cfg.pooling), k)
        recall = {r["feature"]: r for r in candidates.to_pylist()}
        return Picks(
            top["id"].to_pylist(),
            top["score"].to_numpy(),
            {
                "task_features": task_features,
                "any_positive_delta": bool(helpful),
                "feature_effects": [r | recall[r["feature"]] for r in effects.to_pylist()],
            },
        )


def held_out(ids: list[str], fraction: float, seed: int) -> set[str]:
    """The targets kept back for measuring interventions; the rest are for frequency recall."""
    if len(ids) < 2:
        raise ValueError(f"igds.targets: IGDS needs at least 2 target examples, got {len(ids)}")
    order = np.random.default_rng(seed).permutation(sorted(ids))
    n_dev = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return set(order[:n_dev].tolist())


def dev_pairs(stack: ModelStack, targets: Storage, dev: set[str]) -> tuple[list[str], list[str]]:
    """(prompt rendered up to the assistant's turn, reference answer) of each held-out target."""
    table = pq.read_table(targets.path(paths.PREPARED), columns=["id", "messages"], filesystem=targets.fs)
    tokenizer = load_tokenizer(stack.model)
    template = chat_template_for(tokenizer, stack.prepare.chat_template)
    prompts, answers = [], []
    for i, messages in sorted(zip(table["id"].to_pylist(), table["messages"].to_pylist()), key=lambda r: r[0]):
        if i in dev and messages and messages[-1]["role"] == "assistant" and len(messages) > 1:
            prompts.append(
                tokenizer.apply_chat_template(
                    messages[:-1], tokenize=False, add_generation_prompt=True, chat_template=template
                )
            )
            answers.append(messages[-1]["content"])
    if not prompts:
        raise ValueError("igds.targets: IGDS needs targets with an answer (an assistant turn or an output field)")
    return prompts, answers


def frequency_recall(targets: pa.Table, tau: float, pool_doc_freq: np.ndarray, n_pool: int, n: int) -> pa.Table:
    """The n features most enriched on the targets over the pool, by share of samples activating them."""
    _, feats, _ = activated_entries(targets, tau)
    target_share = np.bincount(feats, minlength=pool_doc_freq.size) / max(targets.num_rows, 1)
    pool_share = pool_doc_freq / max(n_pool, 1)
    lift = target_share - pool_share
    order = np.lexsort((np.arange(lift.size), -lift))
    order = order[target_share[order] > 0][:n]
    return pa.table(
        {
            "feature": order.astype(np.int64),
            "target_share": target_share[order],
            "pool_share": pool_share[order],
            "lift": lift[order],
        }
    )


@contextlib.contextmanager
def amplified(model, layer: int, vector, counted=None):
    """Add `vector` to the output of decoder block `layer` (-1: of the embeddings) while inside; `counted`
    (batch, seq) masks the positions it is added to (all of them when None). The hook is removed on the
    way out."""

    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        shift = vector.to(hidden.dtype)
        if counted is not None and counted.shape == hidden.shape[:2]:
            shift = counted[..., None].to(hidden.dtype) * shift
        return (hidden + shift, *output[1:]) if isinstance(output, tuple) else hidden + shift

    module = decoder_layers(model)[layer] if layer >= 0 else model.get_input_embeddings()
    handle = module.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


def decoder_layers(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return base.layers


class TaskMetric:
    """The task metric of a full causal LM on held-out (prompt, answer) pairs, with or without a
    feature amplified: mean answer log-likelihood per token, or exact match of the final number."""

    def __init__(self, stack: ModelStack, cfg: IGDSConfig, prompts: list[str], answers: list[str]):
        import torch

        self.torch, self.cfg, self.max_tokens = torch, cfg, stack.prepare.max_tokens
        self.device = resolve_device(stack.encode.device)
        self.tokenizer = load_tokenizer(stack.model)
        self.model = load_model(stack.model, self.device)
        self.prompts, self.answers = prompts, answers
        template = chat_template_for(self.tokenizer, stack.prepare.chat_template)
        self.prefix_len = len(tokenize(self.tokenizer, [shared_prefix(self.tokenizer, template)])["input_ids"][0])

    def __call__(self, layer: int | None = None, vector=None) -> float:
        if self.cfg.metric == "exact_match":
            return float(np.mean([self._exact(i, layer, vector) for i in range(len(self.prompts))]))
        scores = []
        for start in range(0, len(self.prompts), self.cfg.batch_size):
            scores += self._loglik(range(start, min(start + self.cfg.batch_size, len(self.prompts))), layer, vector)
        return float(np.mean(scores))

    def _loglik(self, rows, layer, vector) -> list[float]:
        torch, tok = self.torch, self.tokenizer
        seqs, starts = [], []
        for i in rows:
            prompt = tokenize(tok, [self.prompts[i]])["input_ids"][0]  # as the encoder sees it: one BOS
            answer = tok(self.answers[i] + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
            seq = (prompt + answer)[: self.max_tokens]
            seqs.append(seq)
            starts.append(min(len(prompt), len(seq) - 1))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id or 0, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
        lengths = torch.tensor([len(s) for s in seqs])
        positions = torch.arange(width)[None, :]
        attention = positions < lengths[:, None]
        counted = (attention & (positions >= max(self.prefix_len, 1))).to(self.device)
        with torch.inference_mode(), self._maybe(layer, vector, counted):
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=attention.long().to(self.device), use_cache=False
            ).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(self.device))[..., 0]
        out = []
        for r, (s, start) in enumerate(zip(seqs, starts)):
            out.append(float(logp[r, start - 1 : len(s) - 1].mean()))  # predictions of the answer's tokens
        return out

    def _exact(self, i: int, layer, vector) -> bool:
        torch, tok = self.torch, self.tokenizer
        ids = torch.tensor(tokenize(tok, [self.prompts[i]])["input_ids"], device=self.device)
        with torch.inference_mode(), self._maybe(layer, vector, None):
            out = self.model.generate(
                ids,
                max_new_tokens=self.cfg.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
        said = final_number(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        return said is not None and said == final_number(self.answers[i])

    def _maybe(self, layer, vector, counted):
        return amplified(self.model, layer, vector, counted) if vector is not None else contextlib.nullcontext()


def final_number(text: str) -> str | None:
    """The answer's number: after GSM8K's '####' when present, else the last number in the text."""
    tail = text.split("####")[-1]
    found = re.findall(r"-?\d[\d,]*\.?\d*", tail)
    return found[-1].replace(",", "").rstrip(".") if found else None


class FeatureEffects:
    """Stage: each row names a candidate feature; measure the task metric with it amplified."""

    def __init__(
        self,
        stack: ModelStack,
        cfg: IGDSConfig,
        prompts: list[str],
        answers: list[str],
        feature_max: dict[int, float],
        layer: int,
    ):
        self.metric = TaskMetric(stack, cfg, prompts, answers)
        self.decoder = load_sae(stack, self.metric.device).W_dec.detach()
        self.cfg, self.feature_max, self.layer = cfg, feature_max, layer
        self.base = self.metric()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for j in batch["feature"].to_pylist():
            vector = self.cfg.alpha * self.feature_max[j] * self.decoder[j]
            value = self.metric(self.layer, vector)
            rows.append({"feature": j, "base": self.base, "amplified": value, "delta": value - self.base})
        return pa.Table.from_pylist(rows)


def feature_effects(
    stack: ModelStack,
    cfg: IGDSConfig,
    candidates: list[int],
    prompts: list[str],
    answers: list[str],
    feature_max: dict[int, float],
    layer: int,
) -> pa.Table:
    """delta of every candidate, computed in parallel on `actors` full models."""
    resources = model_resources(stack.encode, min(cfg.actors, len(candidates)))
    items = ray.data.from_items([{"feature": j} for j in candidates], override_num_blocks=len(candidates))
    effects = map_stage(
        items,
        FeatureEffects,
        resources,
        stack=stack,
        cfg=cfg,
        prompts=prompts,
        answers=answers,
        feature_max=feature_max,
        layer=layer,
    )
    table = pa.concat_tables(ray.get(effects.to_arrow_refs()))
    return table.sort_by([("delta", "descending"), ("feature", "ascending")])


def resonant_scores(table: pa.Table, features: np.ndarray, pooling: str) -> np.ndarray:
    """FRS(x): the pooled activation of the task features, summed."""
    rows, feats, values = pooled(table, pooling)
    hit = np.isin(feats, features)
    return np.bincount(rows[hit], values[hit], minlength=table.num_rows)
