"""The encoder: a model cut at the SAE's hook layer plus the SAE, texts in, sparse pooled features
out (the feature store's rows, core/features.py).

Samples are sorted by length and packed into forward passes under a padded-token budget;
padding, the first position (an attention sink) and, optionally, the chat template's shared
prefix are dropped before the SAE. Per sample only the features that fire are kept."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from raysel.core.features import DENSE, FEATURE_SCHEMA
from raysel.core.models import ModelConfig, load_model, load_tokenizer, resolve_device, tokenize, truncate_to_layer
from raysel.core.records import PrepareConfig, chat_template_for, shared_prefix, system_scaffold
from raysel.core.sae import SAESection, TrainSAEConfig, hook_layer, load_sae
from raysel.core.section import ConfigError, Section
from raysel.core.spans import TopSpans, batch_spans
from raysel.core.storage import S3Config


class EncodeConfig(Section):
    actors: int = Field(1, gt=0)
    """encode actors, each with its own model and SAE; on GPU nodes, one per GPU"""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per actor (fractions share a GPU); `> 0` runs the model actors on CUDA, and they wait for GPUs as Ray
    schedules"""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs per actor; on CPU, also its torch threads"""
    memory_gb: float = Field(4.0, gt=0)
    """heap memory reserved per actor"""
    resources: dict[str, float] = {}
    """custom Ray resources each model actor needs, e.g. `{encoder: 1}`: the actors (encode, spans, IGDS, synthesis) run
    only on nodes that offer them"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: cuda where `encode.num_gpus > 0`, else cpu; `cuda` needs `encode.num_gpus > 0`"""
    tokens_per_batch: int = Field(8192, gt=0)
    """padded tokens per forward pass (samples are bucketed by length)"""
    skip_prefix: bool = True
    """leave the chat template's scaffolding out of pooling: its shared prefix (a default system prompt, the user's
    header), or a sample's own system turn and headers up to its user's text"""
    top_m: int | None = Field(None, gt=0)
    """keep only the M strongest features per sample"""
    keep_dense: bool = False
    """also keep each sample's unit mean hidden state at the hook (`method: dense`'s vector, d_in float32s a sample:
    2.3 KB for SmolLM2-135M) beside the features, so `dense` reads them instead of a forward pass of its own"""

    @model_validator(mode="after")
    def _device_and_gpus_agree(self) -> EncodeConfig:
        if self.device == "cuda" and not self.num_gpus:
            raise ValueError("encode.device: cuda needs encode.num_gpus > 0 (the GPUs Ray gives each actor)")
        if self.device == "cpu" and self.num_gpus:
            raise ValueError("encode.num_gpus: > 0 with encode.device: cpu would hold GPUs no actor uses")
        return self

    def runs_on(self) -> str:
        """The device the config asks for, never what a cluster happens to show: a run started before
        its GPU workers joined must wait for them, not encode in another dtype on the CPUs."""
        return "cuda" if self.num_gpus else "cpu"


class ModelStack(Section):
    """What a component that runs the model and its SAE reads (the encoder, spans, IGDS's metric, the
    judge and generator): the run's model, SAE, encode and prepare sections, and the input's shape."""

    model: ModelConfig
    sae: SAESection
    train_sae: TrainSAEConfig  # where the default SAE lives when sae.* names none
    encode: EncodeConfig
    prepare: PrepareConfig
    s3: S3Config
    shape: str  # the input's shape: plain text has no chat-template prefix to skip


CHUNK_BYTES = 256 << 20  # the SAE's dense activations of one token chunk


# What encode.skip_prefix leaves out of pooling; part of the encode key, so a store pooled by an older
# rule (the shared prefix alone: a sample with its own system turn pooled it) is not resumed as this one.
SKIPPED = "the template's shared prefix, or a sample's own system turn up to its user's text"


class Encoder:
    """A model cut at the hook layer plus its SAE: texts in, sparse features out."""

    def __init__(self, stack: ModelStack):
        import torch

        self.torch, self.encode, self.max_tokens = torch, stack.encode, stack.prepare.max_tokens
        self.device = resolve_device(stack.encode.runs_on())
        if self.device == "cpu":  # one thread per CPU Ray gave this actor
            torch.set_num_threads(max(1, int(stack.encode.num_cpus)))
        self.tokenizer = load_tokenizer(stack.model)
        self.sae = sparse_topk(load_sae(stack, self.device).eval())
        model = load_model(stack.model, self.device)
        if self.sae.cfg.d_in != model.config.hidden_size:
            raise ConfigError(
                f"sae: d_in {self.sae.cfg.d_in} is not the model's hidden size {model.config.hidden_size}"
            )
        self.layer = hook_layer(stack, self.sae.cfg.metadata.hook_name)
        self.schema = FEATURE_SCHEMA
        if stack.encode.keep_dense:
            self.schema = self.schema.append(pa.field(DENSE, pa.list_(pa.float32(), self.sae.cfg.d_in)))
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.model = truncate_to_layer(model, self.layer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        prefix, scaffold = "", None
        if stack.encode.skip_prefix and stack.shape != "text":
            template = chat_template_for(self.tokenizer, stack.prepare.chat_template)
            prefix, scaffold = shared_prefix(self.tokenizer, template), system_scaffold(self.tokenizer, template)
        self.prefix_ids = tokenize(self.tokenizer, [prefix])["input_ids"][0] if prefix else []
        # a sample's own system turn: its header (with the BOS, as samples are tokenized) and what follows it
        self.system_ids = scaffold and (
            tokenize(self.tokenizer, [scaffold[0]])["input_ids"][0],
            self.tokenizer(scaffold[1], add_special_tokens=False)["input_ids"],
        )

    def __call__(
        self, ids: list[str], texts: list[str], spans: TopSpans | None = None, on_batch: Callable | None = None
    ) -> pa.Table:
        """The samples' pooled features; with `spans`, each batch's span candidates go there too, and
        `on_batch` hears how many samples each batch held."""
        enc = tokenize(self.tokenizer, texts, truncation=True, max_length=self.max_tokens)["input_ids"]
        buckets = list(self.length_buckets(enc))
        named, parts = np.asarray(ids, dtype=object), []
        for batch in buckets:
            parts.append(self._encode_batch([enc[i] for i in batch], named[batch], spans))
            if on_batch:
                on_batch(len(batch))
        order = np.concatenate(buckets)
        n_tokens = np.concatenate([p[0] for p in parts])
        columns = [pa.concat_arrays([p[k] for p in parts]) for k in range(1, len(parts[0]))]
        table = pa.table(
            [pa.array(np.asarray(ids, dtype=object)[order], pa.string()), pa.array(n_tokens, pa.int32()), *columns],
            schema=self.schema,
        )
        return table.take(np.argsort(order))

    def encode_isolated(
        self, ids: list[str], texts: list[str], spans: TopSpans | None = None, on_batch: Callable | None = None
    ) -> tuple[pa.Table, dict[str, str]]:
        """As calling the encoder, but a sample that fails on its own is left out, with its error; the
        others are encoded. A failed batch is halved until the failures are single samples."""
        try:
            return self(ids, texts, spans, on_batch), {}
        except Exception as err:
            if len(ids) == 1:
                return self.schema.empty_table(), {ids[0]: f"{type(err).__name__}: {err}"[:2000]}
        half = len(ids) // 2
        (a, errors_a), (b, errors_b) = (
            self.encode_isolated(i, t, spans, on_batch)
            for i, t in ((ids[:half], texts[:half]), (ids[half:], texts[half:]))
        )
        return pa.concat_tables([a, b]), errors_a | errors_b

    def length_buckets(self, enc: list[list[int]]):
        """Indices in batches of similar length, each under the padded-token budget."""
        order = np.argsort([-len(x) for x in enc], kind="stable")
        batch: list[int] = []
        for i in order:
            if batch and len(enc[batch[0]]) * (len(batch) + 1) > self.encode.tokens_per_batch:
                yield np.array(batch)
                batch = []
            batch.append(i)
        if batch:
            yield np.array(batch)

    def _encode_batch(self, seqs: list[list[int]], ids: np.ndarray, spans: TopSpans | None):
        torch = self.torch
        hidden, counted = self.hidden_states(seqs)
        n_counted = counted.sum(1)
        with torch.inference_mode():
            tokens, features, values = self._activations(hidden[counted].to(self.sae.dtype))
            sample = torch.repeat_interleave(torch.arange(len(seqs), device=hidden.device), n_counted)[tokens]
            feat_max, feat_sum = self._pooled(sample, features, values, len(seqs))
            if spans is not None:
                found = batch_spans((sample, tokens, features, values), feat_max, n_counted, self._first_counted(seqs))
                spans.add(ids, found)
            pooled = self._pool(feat_max, feat_sum, n_counted.cpu())
            if not self.encode.keep_dense:
                return pooled
            means = self.unit_means(hidden, counted)
            return *pooled, pa.FixedSizeListArray.from_arrays(means.ravel(), means.shape[1])

    def _activations(self, h):
        """(token, feature, activation) of every non-zero activation of the SAE on the tokens `h`."""
        parts = list(sae_activations(self.sae, h))
        return [self.torch.cat([p[i] for p in parts]) for i in range(3)]

    def _pooled(self, sample, features, values, n: int):
        """Max- and sum-pool per sample of the activations, the top_m strongest features kept when set."""
        torch, d_sae = self.torch, self.sae.cfg.d_sae
        at = sample * d_sae + features
        feat_max = torch.zeros(n * d_sae, dtype=values.dtype, device=values.device)
        feat_sum = torch.zeros_like(feat_max)
        feat_max.scatter_reduce_(0, at, values, "amax")  # activations are >= 0: 0 is the empty max
        feat_sum.scatter_add_(0, at, values)
        feat_max, feat_sum = feat_max.view(n, d_sae), feat_sum.view(n, d_sae)
        if self.encode.top_m:
            kth = feat_max.topk(min(self.encode.top_m, d_sae), dim=1).values[:, -1:]
            feat_max = torch.where(feat_max >= kth, feat_max, torch.zeros_like(feat_max))
        return feat_max, feat_sum

    def fit(self, texts: list[str]) -> dict:
        """How well the SAE reconstructs the model's activations at its hook, over the counted positions
        of `texts`: explained variance (1 - residual / total variance) and L0 (active latents a token)."""
        torch = self.torch
        seqs = tokenize(self.tokenizer, texts, truncation=True, max_length=self.max_tokens)["input_ids"]
        hidden, counted = self.hidden_states(seqs)
        h = hidden[counted].to(self.sae.dtype).float()
        residual, active = 0.0, 0
        chunk = max(1, CHUNK_BYTES // (self.sae.cfg.d_sae * 4))
        with torch.inference_mode():
            for start in range(0, h.shape[0], chunk):
                z = self.sae.encode(h[start : start + chunk].to(self.sae.dtype))
                residual += float((h[start : start + chunk] - self.sae.decode(z).float()).pow(2).sum())
                active += len(nonzero(z)[0])
        total = float((h - h.mean(0)).pow(2).sum())
        return {
            "explained_variance": round(1 - residual / total, 4) if total > 0 else None,
            "l0": round(active / max(h.shape[0], 1), 2),
            "tokens": int(h.shape[0]),
        }

    def unit_means(self, hidden, counted) -> np.ndarray:
        """Each sample's hidden state mean-pooled over its counted positions, unit length (n x d_in)."""
        mask = counted[..., None].to(hidden.dtype)
        mean = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float()
        return self.torch.nn.functional.normalize(mean, dim=1).cpu().numpy()

    def hidden_states(self, seqs: list[list[int]]):
        """The residual stream after the hook layer for a padded batch, and which positions count."""
        torch = self.torch
        if (top := max(max(s, default=0) for s in seqs)) >= self.vocab_size:
            # On a GPU the embedding lookup would be a device-side assert that ends the whole actor.
            raise ValueError(f"token id {top} is outside the model's embedding ({self.vocab_size} rows)")
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for row, s in enumerate(seqs):
            input_ids[row, : len(s)] = torch.tensor(s)
        lengths = torch.tensor([len(s) for s in seqs])
        positions = torch.arange(width)
        attention = (positions[None, :] < lengths[:, None]).long()
        counted = attention.bool() & (positions[None, :] >= self._first_counted(seqs)[:, None])
        with torch.inference_mode():
            hidden = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), use_cache=False
            ).last_hidden_state
        return hidden, counted.to(self.device)

    def _first_counted(self, seqs: list[list[int]]):
        """Position 0 is an attention sink, never pooled; the template's scaffolding neither, when skipped:
        its shared prefix (a default system prompt, the user's header), or a sample's own system turn up
        to its user's text. A sample whose tokens do not hold the scaffolding as rendered alone is pooled
        from position 1."""
        return self.torch.tensor([self._scaffolding(s) for s in seqs])

    def _scaffolding(self, seq: list[int]) -> int:
        k = len(self.prefix_ids)
        if k and seq[:k] == self.prefix_ids:
            return k
        if self.system_ids:
            header, between = self.system_ids
            if seq[: len(header)] == header:
                end = find(seq, between, len(header))
                if end is not None:
                    return end
        return 1

    def _pool(self, feat_max, feat_sum, n_counted):
        """Keep, per sample, the features that fire (those _pooled kept), as list columns."""
        torch = self.torch
        rows, cols = (feat_max > 0).nonzero(as_tuple=True)  # row-major: ids ascend within a row
        offsets = np.concatenate([[0], torch.bincount(rows, minlength=len(n_counted)).cumsum(0).cpu().numpy()])
        offsets = pa.array(offsets.astype(np.int32))

        def lists(values, arrow_type):
            return pa.ListArray.from_arrays(offsets, pa.array(values.cpu().numpy(), arrow_type))

        return (
            n_counted.numpy(),
            lists(cols.int(), pa.int32()),
            lists(feat_max[rows, cols].float(), pa.float32()),
            lists(feat_sum[rows, cols].float(), pa.float32()),
        )


def sae_activations(sae, h):
    """(token, feature, activation) of each non-zero activation of `sae` on the tokens `h`, over
    token chunks of at most CHUNK_BYTES of pre-activations: tokens x d_sae never exists for a whole
    batch (4 GB at 131k latents and 8k tokens). A TopK SAE set by sparse_topk yields its k per token directly."""
    chunk = max(1, CHUNK_BYTES // (sae.cfg.d_sae * h.element_size()))
    for start in range(0, h.shape[0], chunk):
        tokens, features, values = nonzero(sae.encode(h[start : start + chunk].to(sae.dtype)))
        yield start + tokens, features, values


def sparse_topk(sae):
    """A TopK SAE set to return its activations as a sparse tensor (sae-lens's own sparse TopK): the k
    largest of each token are read off directly, not scattered into tokens x d_sae zeros and found again."""
    import torch
    from sae_lens.saes.topk_sae import TopK

    # sae-lens builds the sparse tensor from indices it made itself; opting out of torch's check (off by
    # default anyway) says so and stops its warning on every call
    torch.sparse.check_sparse_tensor_invariants.disable()
    if isinstance(sae.activation_fn, TopK):
        sae.activation_fn = TopK(sae.activation_fn.k, use_sparse_activations=True)
    return sae


def nonzero(z):
    """(token, feature, activation) of the non-zero entries of the SAE's output, dense or sparse."""
    if z.is_sparse:
        (tokens, features), values = z._indices(), z._values()
        keep = values > 0  # the k largest can include zeros after the ReLU
        return tokens[keep], features[keep], values[keep]
    tokens, features = z.nonzero(as_tuple=True)
    return tokens, features, z[tokens, features]


def find(seq: list[int], part: list[int], start: int) -> int | None:
    """The end of `part`'s first occurrence in `seq` at or after `start`."""
    n = len(part)
    for i in range(start, len(seq) - n + 1):
        if seq[i : i + n] == part:
            return i + n
    return None
