"""The encode stage: prepared samples to sparse pooled SAE features.

The model runs only up to the SAE's hook layer. Samples are sorted by length
and packed into forward passes under a padded-token budget; padding, the first
position (an attention sink) and, optionally, the chat template's shared
prefix are dropped before the SAE. Per sample only the features that fire are
kept:

    id        string
    n_tokens  int32            tokens pooled over
    feat_ids  list<int32>      ascending
    feat_max  list<float32>    max-pool g(x) of each listed feature
    feat_sum  list<float32>    sum-pool s(x); the mean-pool is feat_sum / n_tokens

One features/ shard per prepared file, under the same name, then a marker in
features/_done/. A re-run encodes only the shards without a current marker."""

from __future__ import annotations

import json
import logging
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from raysel.config import ConfigError, RunConfig
from raysel.corpus import fingerprint
from raysel.models import load_model, load_tokenizer, resolve_device, truncate_to_layer
from raysel.records import chat_template_for, shared_prefix
from raysel.sae import check_against_model, hook_layer, load_sae, sae_metadata
from raysel.stages import Resources, log_to_driver, map_stage
from raysel.storage import Storage, StorageError

log = logging.getLogger(__name__)

MARKER = "stages/encode.json"
DONE = "features/_done"
FEATURE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("n_tokens", pa.int32()),
    ("feat_ids", pa.list_(pa.int32())),
    ("feat_max", pa.list_(pa.float32())),
    ("feat_sum", pa.list_(pa.float32())),
])


class Encoder:
    """A model cut at the hook layer plus its SAE: texts in, sparse features out."""

    def __init__(self, cfg: RunConfig):
        import torch

        self.torch, self.cfg = torch, cfg
        self.device = resolve_device(cfg.encode.device)
        if self.device == "cpu":  # one thread per CPU Ray gave this actor
            torch.set_num_threads(max(1, int(cfg.encode.num_cpus)))
        self.tokenizer = load_tokenizer(cfg.model)
        self.sae = load_sae(cfg, self.device).eval()
        model = load_model(cfg.model, self.device)
        if self.sae.cfg.d_in != model.config.hidden_size:
            raise ConfigError(f"sae: d_in {self.sae.cfg.d_in} is not the model's hidden size {model.config.hidden_size}")
        self.layer = hook_layer(cfg, self.sae.cfg.metadata.hook_name)
        self.model = truncate_to_layer(model, self.layer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        prefix = ""
        if cfg.encode.skip_prefix and cfg.input.shape != "text":
            prefix = shared_prefix(self.tokenizer, chat_template_for(self.tokenizer, cfg.prepare.chat_template))
        self.prefix_ids = self.tokenizer(prefix)["input_ids"] if prefix else []

    def __call__(self, ids: list[str], texts: list[str]) -> pa.Table:
        enc = self.tokenizer(texts, truncation=True, max_length=self.cfg.prepare.max_tokens)["input_ids"]
        buckets = list(self.length_buckets(enc))
        parts = [self._encode_batch([enc[i] for i in batch]) for batch in buckets]
        order = np.concatenate(buckets)
        n_tokens = np.concatenate([p[0] for p in parts])
        columns = [pa.concat_arrays([p[k] for p in parts]) for k in (1, 2, 3)]
        table = pa.table([pa.array(np.asarray(ids, dtype=object)[order], pa.string()),
                          pa.array(n_tokens, pa.int32()), *columns], schema=FEATURE_SCHEMA)
        return table.take(np.argsort(order))

    def length_buckets(self, enc: list[list[int]]):
        """Indices in batches of similar length, each under the padded-token budget."""
        order = np.argsort([-len(x) for x in enc], kind="stable")
        batch: list[int] = []
        for i in order:
            if batch and len(enc[batch[0]]) * (len(batch) + 1) > self.cfg.encode.tokens_per_batch:
                yield np.array(batch)
                batch = []
            batch.append(i)
        if batch:
            yield np.array(batch)

    def _encode_batch(self, seqs: list[list[int]]):
        hidden, counted = self.hidden_states(seqs)
        with self.torch.inference_mode():
            z = self.sae.encode(hidden[counted].to(self.sae.dtype))
            return self._pool(z, counted.sum(1).cpu())

    def activations(self, seqs: list[list[int]]) -> list[tuple]:
        """Per sequence: the first counted position, and the SAE's activations at every counted
        position from there on (positions x d_sae), for looking inside one sample."""
        hidden, counted = self.hidden_states(seqs)
        with self.torch.inference_mode():
            z = self.sae.encode(hidden[counted].to(self.sae.dtype)).float().cpu()
        first = self._first_counted(seqs).tolist()
        return list(zip(first, z.split(counted.sum(1).cpu().tolist())))

    def hidden_states(self, seqs: list[list[int]]):
        """The residual stream after the hook layer for a padded batch, and which positions count."""
        torch = self.torch
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for row, s in enumerate(seqs):
            input_ids[row, : len(s)] = torch.tensor(s)
        lengths = torch.tensor([len(s) for s in seqs])
        positions = torch.arange(width)
        attention = (positions[None, :] < lengths[:, None]).long()
        counted = attention.bool() & (positions[None, :] >= self._first_counted(seqs)[:, None])
        with torch.inference_mode():
            hidden = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                use_cache=False).last_hidden_state
        return hidden, counted.to(self.device)

    def _first_counted(self, seqs: list[list[int]]):
        """Position 0 is an attention sink, never pooled; the template's shared prefix neither, when set."""
        k = len(self.prefix_ids)
        skip = [k if k and s[:k] == self.prefix_ids else 1 for s in seqs]
        return self.torch.tensor(skip)

    def _pool(self, z, n_counted):
        """Max- and sum-pool each sample's rows of z, and keep the features that fire."""
        torch = self.torch
        has = n_counted > 0  # a sample with nothing left to pool gets no features
        feat_max = torch.zeros(len(n_counted), z.shape[1], dtype=z.dtype, device=z.device)
        feat_sum = torch.zeros_like(feat_max)
        if has.any():
            lengths = n_counted[has].to(z.device)
            feat_max[has.to(z.device)] = torch.segment_reduce(z, "max", lengths=lengths, axis=0)
            feat_sum[has.to(z.device)] = torch.segment_reduce(z, "sum", lengths=lengths, axis=0)
        if self.cfg.encode.top_m:
            kth = feat_max.topk(min(self.cfg.encode.top_m, z.shape[1]), dim=1).values[:, -1:]
            feat_max = torch.where(feat_max >= kth, feat_max, torch.zeros_like(feat_max))
        rows, cols = (feat_max > 0).nonzero(as_tuple=True)  # row-major: ids ascend within a row
        offsets = np.concatenate([[0], torch.bincount(rows, minlength=len(n_counted)).cumsum(0).cpu().numpy()])
        offsets = pa.array(offsets.astype(np.int32))

        def lists(values, arrow_type):
            return pa.ListArray.from_arrays(offsets, pa.array(values.cpu().numpy(), arrow_type))

        return (n_counted.numpy(), lists(cols.int(), pa.int32()),
                lists(feat_max[rows, cols].float(), pa.float32()), lists(feat_sum[rows, cols].float(), pa.float32()))


class EncodeShards:
    """Stage: each input row names a prepared file; encode it and write its features shard, then its marker."""

    def __init__(self, cfg: RunConfig, fingerprint: str):
        log_to_driver()
        self.encoder = Encoder(cfg)
        self.storage = Storage(cfg.output.root, cfg.s3)
        self.fingerprint = fingerprint

    def __call__(self, batch: pa.Table) -> pa.Table:
        done = []
        for shard in batch["shard"].to_pylist():
            try:
                self.encode_shard(shard)
                done.append({"shard": shard, "error": None})
            except StorageError as err:  # the driver raises it: Ray Data would only pass on its traceback
                done.append({"shard": shard, "error": str(err)})
        return pa.Table.from_pylist(done, schema=pa.schema([("shard", pa.string()), ("error", pa.string())]))

    def encode_shard(self, shard: str) -> None:
        storage, fs = self.storage, self.storage.fs
        start = time.time()
        rows = storage.retrying(f"reading prepared/{shard}", lambda: pq.read_table(
            storage.path("prepared", shard), columns=["id", "text"], filesystem=fs))
        features = self.encoder(rows["id"].to_pylist(), rows["text"].to_pylist())
        n_tokens = int(pc.sum(features["n_tokens"]).as_py() or 0)
        summary = {"shard": shard, "rows": features.num_rows, "tokens": n_tokens,
                   "seconds": round(time.time() - start, 3), "fingerprint": self.fingerprint,
                   "node": ray.get_runtime_context().get_node_id()}  # where it ran, for the record

        def commit():
            fs.create_dir(storage.path("features"), recursive=True)
            pq.write_table(features, storage.path("features", shard), filesystem=fs)
            storage.write_json(posixpath.join(DONE, f"{shard}.json"), summary)  # last: the shard is done

        storage.retrying(f"writing features/{shard}", commit)
        log.info("encode: %s: %d samples in %.1fs (%.0f samples/s)", shard, summary["rows"],
                 summary["seconds"], summary["rows"] / max(summary["seconds"], 1e-9))


def model_resources(cfg: RunConfig, actors: int, batch_size: int = 1) -> Resources:
    """What an actor holding a model needs: encode.num_gpus of a GPU when the cluster has GPUs (and the
    config does not pin the CPU), else encode.num_cpus CPUs; encode.memory_gb of heap either way."""
    gpus = ray.cluster_resources().get("GPU", 0) > 0 and cfg.encode.device != "cpu"
    return Resources(actors=actors, batch_size=batch_size, num_cpus=cfg.encode.num_cpus,
                     num_gpus=cfg.encode.num_gpus if gpus else 0, memory=int(cfg.encode.memory_gb * 2**30),
                     custom=cfg.encode.resources or None)


def encode_fingerprint(cfg: RunConfig, prepared_fp: str, meta: dict) -> str:
    return fingerprint([], prepared_fp, cfg.model.name, cfg.model.dtype, meta, cfg.prepare.max_tokens,
                       cfg.prepare.chat_template, cfg.encode.skip_prefix, cfg.encode.top_m, FEATURE_SCHEMA.to_string())


def run_encode(cfg: RunConfig, storage: Storage, prepared: dict) -> dict:
    meta = sae_metadata(cfg)
    check_against_model(cfg, meta)
    fp = encode_fingerprint(cfg, prepared["fingerprint"], meta)
    shards = sorted(posixpath.basename(i.path) for i in _listing(storage, "prepared") if i.path.endswith(".parquet"))
    markers = done_shards(storage)
    finished = {name: m for name, m in markers.items() if m["fingerprint"] == fp}
    if len(finished) < len(markers):  # features of another input or config: start over
        log.info("encode: features from an earlier input or config; re-encoding everything")
        storage.remove("features")
        finished = {}
    todo = [s for s in shards if s not in finished]
    log.info("encode: %d shard(s), %d already done, %d to encode (layer %s, SAE %s)",
             len(shards), len(finished), len(todo), meta["layer"], meta["identity"])
    start = time.time()
    if todo:
        resources = model_resources(cfg, min(cfg.encode.actors, len(todo)))
        items = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
        failed = [r["error"] for r in map_stage(items, EncodeShards, resources, cfg=cfg, fingerprint=fp).take_all()
                  if r["error"]]
        if failed:
            raise StorageError(f"encode: {len(failed)} shard(s) could not be written; the others are committed, "
                               f"and a re-run encodes only these. First: {failed[0]}")
    markers = done_shards(storage)
    missing = [s for s in shards if s not in markers]
    if missing:
        raise RuntimeError(f"encode: shards {missing[:5]} have no completion marker; re-run to finish them")
    seconds = time.time() - start
    summary = {
        "fingerprint": fp, "layer": meta["layer"], "sae": meta["identity"], "d_sae": meta.get("d_sae"),
        "n_shards": len(shards), "n_shards_encoded": len(todo), "n_shards_skipped": len(shards) - len(todo),
        "n_encoded": sum(markers[s]["rows"] for s in shards),
        "n_tokens": sum(markers[s]["tokens"] for s in shards),
        "seconds": round(seconds, 2),
    }
    encoded_now = sum(markers[s]["rows"] for s in todo)
    log.info("encode: %d samples encoded now in %.1fs (%.1f samples/s); %d in the store",
             encoded_now, seconds, encoded_now / max(seconds, 1e-9), summary["n_encoded"])
    storage.write_json(MARKER, summary)
    return summary


def done_shards(storage: Storage) -> dict[str, dict]:
    markers = {}
    for info in _listing(storage, DONE):
        if not info.path.endswith(".json"):  # a local marker caught mid-write, before its rename
            continue
        name = posixpath.basename(info.path).removesuffix(".json")
        with storage.fs.open_input_stream(info.path) as f:
            markers[name] = json.loads(f.read())
    return markers


def _listing(storage: Storage, rel: str):
    selector = pafs.FileSelector(storage.path(rel), allow_not_found=True)
    return [i for i in storage.fs.get_file_info(selector) if i.is_file]


def feature_paths(storage: Storage) -> list[str]:
    """The feature store's shards that have a completion marker."""
    return [storage.path("features", s) for s in sorted(done_shards(storage))]


def read_features(storage: Storage) -> ray.data.Dataset:
    return ray.data.read_parquet(feature_paths(storage), filesystem=storage.fs)
