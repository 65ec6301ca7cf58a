"""The train-sae stage: the default SAE, a TopK SAE that sae-lens's runner trains on the prepared
texts, for runs that configure none. It trains in a Ray task with the encode actors' resources (a
GPU on a GPU cluster), and lands where `default_sae_location` says: the model cache, where every
later run of the same model finds it, or train_sae.output (s3:// on a cluster, where every node's
encode actors read it). stages/train_sae.json records its training figures."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from raysel.config import ModelStack
from raysel.core import paths
from raysel.core.features import seeded_hash
from raysel.core.models import load_model, load_tokenizer, model_source, resolve_device, truncate_to_layer
from raysel.core.ray_adapter import model_resources
from raysel.core.sae import TRAINING, default_sae_location
from raysel.core.storage import Storage, filesystem_for
from raysel.stages.base import Done, Stage

log = logging.getLogger(__name__)


class TrainSAE(Stage):
    """Train the default SAE on the prepared texts: enough of them for the token budget. Never
    skipped when asked for: `raysel train-sae` retrains in place."""

    name = "train_sae"
    needs = ("prepare",)

    def __init__(self, stack: ModelStack, storage: Storage):
        self.stack, self.storage = stack, storage

    def key(self, done: Done) -> dict | None:
        return None

    def run(self, done: Done) -> dict:
        table = pq.read_table(
            self.storage.path(paths.PREPARED), columns=["id", "text", "n_tokens"], filesystem=self.storage.fs
        )
        # In a seeded order of the ids: Ray Data does not keep the input's order across prepared shards,
        # and the SAE learns from the texts in the order given. Not id order: ids sort by source.
        order = np.argsort(seeded_hash(table["id"].to_numpy(zero_copy_only=False), self.stack.train_sae.seed))
        texts, tokens = [], 0
        for i in order:
            if tokens >= 2 * self.stack.train_sae.training_tokens:
                break
            texts.append(table["text"][int(i)].as_py())
            tokens += table["n_tokens"][int(i)].as_py()
        r = model_resources(self.stack.encode, 1)
        task = ray.remote(num_cpus=r.num_cpus, num_gpus=r.num_gpus, memory=r.memory, resources=r.custom)(train_sae)
        summary, files = ray.get(task.remote(self.stack, texts))
        # what a shipped SAE is matched on (core/sae.py: shipped_sae), and the texts it learnt from, by
        # content (the prepared store's fingerprint holds the input's path)
        summary |= {
            "train_sae": self.stack.train_sae.model_dump(exclude={"output"}),
            "texts": hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16],
        }
        out = save_sae(self.stack, files, summary)
        log.info("train-sae: %s in %.0fs: explained variance %.3f, mean L0 %.1f, dead %.1f%%", out,
                 summary["seconds"], summary["explained_variance"], summary["mean_l0"], 100 * summary["dead_fraction"])  # fmt: skip
        return {**summary, "path": out}


def save_sae(stack: ModelStack, files: dict[str, bytes], summary: dict) -> str:
    """The trained SAE's files where runs find the default SAE: a local folder replaced whole by a
    rename, or a remote one written file by file (its weights last)."""
    location = default_sae_location(stack)
    files = {**files, TRAINING: json.dumps(summary, indent=2).encode()}
    if "://" in location:
        fs, path = filesystem_for(location, stack.s3)
        fs.create_dir(path, recursive=True)
        for name in sorted(files, key=lambda n: n.endswith(".safetensors")):
            with fs.open_output_stream(f"{path}/{name}") as f:
                f.write(files[name])
        return location
    out = Path(location)
    tmp = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return location


def train_sae(stack: ModelStack, texts: list[str]) -> tuple[dict, dict[str, bytes]]:
    """Train a TopK SAE with sae-lens's runner on `texts`, offline, on the device the config asks for
    (a Ray task: wherever Ray placed it). Returns the training summary (explained variance, mean L0,
    dead share) and the saved SAE's files."""
    import torch

    device = resolve_device(stack.encode.runs_on())
    if device == "cpu":  # the CPUs the task asked Ray for, as the encoder does
        torch.set_num_threads(max(1, int(stack.encode.num_cpus)))
    os.environ.setdefault("WANDB_MODE", "disabled")  # before sae-lens imports wandb: offline, no prompts
    import datasets
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        TopKTrainingSAEConfig,
    )
    from transformers import AutoConfig

    t, work = stack.train_sae, Path(tempfile.mkdtemp(prefix="raysel-sae-"))
    source = model_source(stack.model)
    d_in = AutoConfig.from_pretrained(source).hidden_size
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=d_in, d_sae=t.d_sae, k=t.k, normalize_activations="expected_average_only_in"),
        model_name=source,
        model_class_name="AutoModelForCausalLM",
        hook_name=f"model.layers.{t.layer}",
        dataset_path="raysel-prepared",  # the corpus comes in as override_dataset
        is_dataset_tokenized=False,
        streaming=False,
        prepend_bos=False,  # rendered texts already start with the template's own tokens
        # Position 0 is an attention sink with a residual norm ~100x the rest;
        # left in, it dominates the reconstruction loss.
        seqpos_slice=(1, None),
        context_size=t.context_size,
        training_tokens=t.training_tokens,
        train_batch_size_tokens=t.batch_size_tokens,
        # sae-lens needs n_batches_in_buffer * (context_size - 1) >= the batch; two
        # batches' worth lets its mixing buffer shuffle across texts.
        n_batches_in_buffer=max(8, -(-2 * t.batch_size_tokens // (t.context_size - 1))),
        store_batch_size_prompts=8,
        lr=t.lr,
        seed=t.seed,
        device=device,
        n_checkpoints=0,
        checkpoint_path=str(work / "checkpoints"),
        output_path=None,
        n_batches_for_norm_estimate=10,
        # A short run: let TopK's auxiliary loss revive features after 100 quiet steps, not 1000.
        dead_feature_window=100,
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )
    start = time.time()
    corpus = datasets.Dataset.from_dict({"text": texts})
    runner = LanguageModelSAETrainingRunner(
        runner_cfg, override_dataset=corpus, override_model=_hooked_truncated_model(stack, device)
    )
    sae = runner.run()
    seconds = time.time() - start
    summary = {
        **evaluate_sae(sae, runner.activations_store),
        "seconds": round(seconds, 1),
        "training_tokens": t.training_tokens,
        "layer": t.layer,
        "d_sae": t.d_sae,
        "k": t.k,
        "model": stack.model.name,
        "n_texts": len(texts),
    }
    sae.save_model(work / "sae")
    files = {f.name: f.read_bytes() for f in (work / "sae").iterdir() if f.is_file()}
    shutil.rmtree(work, ignore_errors=True)
    return summary, files


def _hooked_truncated_model(stack: ModelStack, device: str):
    """The model as sae-lens's runner wants it, cut after the hook layer.

    Blocks past the hook and the 49k-wide lm_head are more than half the cost
    of a forward pass, and their output is never read: the runner only caches
    the hook's activations."""
    import torch
    from sae_lens.load_model import HookedProxyLM

    model = load_model(stack.model, device)
    truncate_to_layer(model, stack.train_sae.layer)
    model.lm_head = torch.nn.Identity()
    return HookedProxyLM(model, load_tokenizer(stack.model), hook_names=[f"model.layers.{stack.train_sae.layer}"])


def evaluate_sae(sae, store, n_batches: int = 32) -> dict:
    """Explained variance, mean L0 and the share of features that never fire,
    on fresh activation batches from the training store."""
    import torch

    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    sq_err = total_var = l0 = n = 0.0
    with torch.no_grad():
        for _ in range(n_batches):
            x = store.next_batch().reshape(-1, sae.cfg.d_in).to(sae.device, sae.dtype)
            z = sae.encode(x)
            x_hat = sae.decode(z)
            sq_err += (x - x_hat).pow(2).sum().item()
            total_var += (x - x.mean(0)).pow(2).sum().item()
            l0 += (z > 0).sum().item()
            n += x.shape[0]
            fired |= (z > 0).any(0).cpu()
    return {
        "explained_variance": round(1 - sq_err / total_var, 4),
        "mean_l0": round(l0 / n, 2),
        "dead_fraction": round(1 - fired.float().mean().item(), 4),
        "eval_tokens": int(n),
    }
