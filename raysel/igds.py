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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from raysel.activation import pooled
from raysel.config import RunConfig
from raysel.encode import model_resources
from raysel.models import load_model, load_tokenizer, resolve_device
from raysel.records import chat_template_for, shared_prefix
from raysel.sae import load_sae
from raysel.stages import map_stage

log = logging.getLogger(__name__)


def frequency_recall(targets: pa.Table, tau: float, pool_doc_freq: np.ndarray, n_pool: int, n: int) -> pa.Table:
    """The n features most enriched on the targets over the pool, by share of samples activating them."""
    active = pc.greater(pc.list_flatten(targets["feat_max"]), tau)
    feats = pc.list_flatten(targets["feat_ids"]).filter(active).to_numpy().astype(np.int64)
    target_share = np.bincount(feats, minlength=pool_doc_freq.size) / max(targets.num_rows, 1)
    pool_share = pool_doc_freq / max(n_pool, 1)
    lift = target_share - pool_share
    order = np.lexsort((np.arange(lift.size), -lift))
    order = order[target_share[order] > 0][:n]
    return pa.table({"feature": order.astype(np.int64), "target_share": target_share[order],
                     "pool_share": pool_share[order], "lift": lift[order]})


@contextlib.contextmanager
def amplified(model, layer: int, vector, counted=None):
    """Add `vector` to the output of decoder block `layer` while inside; `counted` (batch, seq) masks
    the positions it is added to (all of them when None). The hook is removed on the way out."""
    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        shift = vector.to(hidden.dtype)
        if counted is not None and counted.shape == hidden.shape[:2]:
            shift = counted[..., None].to(hidden.dtype) * shift
        return (hidden + shift, *output[1:]) if isinstance(output, tuple) else hidden + shift

    handle = decoder_layers(model)[layer].register_forward_hook(add)
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

    def __init__(self, cfg: RunConfig, prompts: list[str], answers: list[str]):
        import torch

        self.torch, self.cfg = torch, cfg
        self.device = resolve_device(cfg.encode.device)
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_model(cfg.model, self.device)
        self.prompts, self.answers = prompts, answers
        template = chat_template_for(self.tokenizer, cfg.prepare.chat_template)
        self.prefix_len = len(self.tokenizer(shared_prefix(self.tokenizer, template))["input_ids"])

    def __call__(self, layer: int | None = None, vector=None) -> float:
        if self.cfg.igds.metric == "exact_match":
            return float(np.mean([self._exact(i, layer, vector) for i in range(len(self.prompts))]))
        scores = []
        for start in range(0, len(self.prompts), self.cfg.igds.batch_size):
            scores += self._loglik(range(start, min(start + self.cfg.igds.batch_size, len(self.prompts))), layer, vector)
        return float(np.mean(scores))

    def _loglik(self, rows, layer, vector) -> list[float]:
        torch, tok = self.torch, self.tokenizer
        seqs, starts = [], []
        for i in rows:
            prompt = tok(self.prompts[i], add_special_tokens=False)["input_ids"]
            answer = tok(self.answers[i] + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
            seq = (prompt + answer)[: self.cfg.prepare.max_tokens]
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
            logits = self.model(input_ids=ids.to(self.device), attention_mask=attention.long().to(self.device),
                                use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(self.device))[..., 0]
        out = []
        for r, (s, start) in enumerate(zip(seqs, starts)):
            out.append(float(logp[r, start - 1: len(s) - 1].mean()))  # predictions of the answer's tokens
        return out

    def _exact(self, i: int, layer, vector) -> bool:
        torch, tok = self.torch, self.tokenizer
        ids = tok(self.prompts[i], add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        with torch.inference_mode(), self._maybe(layer, vector, None):
            out = self.model.generate(ids, max_new_tokens=self.cfg.igds.max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id or tok.eos_token_id)
        said = final_number(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
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

    def __init__(self, cfg: RunConfig, prompts: list[str], answers: list[str], feature_max: dict[int, float],
                 layer: int):
        self.metric = TaskMetric(cfg, prompts, answers)
        self.decoder = load_sae(cfg, self.metric.device).W_dec.detach()
        self.cfg, self.feature_max, self.layer = cfg, feature_max, layer
        self.base = self.metric()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for j in batch["feature"].to_pylist():
            vector = self.cfg.igds.alpha * self.feature_max[j] * self.decoder[j]
            value = self.metric(self.layer, vector)
            rows.append({"feature": j, "base": self.base, "amplified": value, "delta": value - self.base})
        return pa.Table.from_pylist(rows)


def feature_effects(cfg: RunConfig, candidates: list[int], prompts: list[str], answers: list[str],
                    feature_max: dict[int, float], layer: int) -> pa.Table:
    """delta of every candidate, computed in parallel on `igds.actors` full models."""
    resources = model_resources(cfg, min(cfg.igds.actors, len(candidates)))
    items = ray.data.from_items([{"feature": j} for j in candidates], override_num_blocks=len(candidates))
    effects = map_stage(items, FeatureEffects, resources, cfg=cfg, prompts=prompts, answers=answers,
                        feature_max=feature_max, layer=layer)
    table = pa.concat_tables(ray.get(effects.to_arrow_refs()))
    return table.sort_by([("delta", "descending"), ("feature", "ascending")])


def resonant_scores(table: pa.Table, features: np.ndarray, pooling: str) -> np.ndarray:
    """FRS(x): the pooled activation of the task features, summed."""
    rows, feats, values = pooled(table, pooling)
    hit = np.isin(feats, features)
    return np.bincount(rows[hit], values[hit], minlength=table.num_rows)
