"""Finding, checking and training the SAE. sae-lens is imported lazily: it
costs seconds to import, and most commands never touch it."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path

from raysel.config import ConfigError, RunConfig
from raysel.models import model_source

log = logging.getLogger(__name__)

WEIGHTS = "sae_weights.safetensors"
SAE_CONFIG = "cfg.json"
PICKLED = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


def default_sae_dir(cfg: RunConfig) -> Path:
    """Where `raysel train-sae` puts the SAE that runs use when none is configured."""
    t = cfg.train_sae
    if t.output:
        return Path(t.output).expanduser()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cfg.model.name).strip("-").lower()
    return Path(cfg.model.cache_dir).expanduser() / "saes" / f"{slug}-L{t.layer}-topk{t.k}-{t.d_sae}"


def local_sae_dir(cfg: RunConfig) -> Path:
    """The SAE's directory on this machine, fetched from S3 into the cache when needed."""
    if cfg.sae.path is None:
        path = default_sae_dir(cfg)
        if not (path / WEIGHTS).is_file():
            raise ConfigError(f"sae.path: not set, and no default SAE at {path}; run `raysel train-sae CONFIG` "
                              f"first, or set sae.path (a saved SAE) or sae.release and sae.sae_id")
        return path
    if cfg.sae.path.startswith("s3://"):
        return _fetch_from_s3(cfg)
    path = Path(cfg.sae.path).expanduser()
    pickled = [p.name for p in (path.glob("*") if path.is_dir() else [path]) if p.suffix in PICKLED]
    if pickled and not (path / WEIGHTS).is_file():
        raise ConfigError(f"sae.path: {cfg.sae.path!r} holds pickled weights ({', '.join(pickled)}); raysel loads "
                          f"SAEs from safetensors only, since unpickling runs code: save it with sae-lens as {WEIGHTS}")
    if not (path / WEIGHTS).is_file() or not (path / SAE_CONFIG).is_file():
        raise ConfigError(f"sae.path: {cfg.sae.path!r} holds no saved SAE ({SAE_CONFIG} and {WEIGHTS} expected)")
    return path


def check_safetensors(path: Path) -> None:
    """Read the weights' header: a file that only bears the name is refused before any work."""
    from safetensors import safe_open

    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            f.keys()
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for bad headers
        raise ConfigError(f"sae.path: {path / WEIGHTS} is not a safetensors file ({err}); raysel loads SAEs "
                          "from safetensors only") from None


def _fetch_from_s3(cfg: RunConfig) -> Path:
    import pyarrow.fs as pafs

    from raysel.storage import filesystem_for

    key = hashlib.sha256(cfg.sae.path.encode()).hexdigest()[:16]
    target = Path(cfg.model.cache_dir).expanduser() / "saes" / "s3" / key
    if not (target / WEIGHTS).is_file():
        fs, path = filesystem_for(cfg.sae.path, cfg.s3)
        target.mkdir(parents=True, exist_ok=True)
        for name in (SAE_CONFIG, WEIGHTS):
            pafs.copy_files(f"{path}/{name}", str(target / name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
    return target


def sae_metadata(cfg: RunConfig) -> dict:
    """d_in and hook layer of the configured SAE, read without loading its weights."""
    if cfg.sae.release:
        return {"d_in": None, "layer": cfg.sae.hook_layer, "identity": f"{cfg.sae.release}/{cfg.sae.sae_id}"}
    path = local_sae_dir(cfg)
    check_safetensors(path)
    meta = json.loads((path / SAE_CONFIG).read_text())
    hook_name = (meta.get("metadata") or {}).get("hook_name") or meta.get("hook_name")
    return {"d_in": meta["d_in"], "d_sae": meta["d_sae"], "layer": hook_layer(cfg, hook_name),
            "identity": str(cfg.sae.path or path), "architecture": meta.get("architecture")}


def hook_layer(cfg: RunConfig, hook_name: str | None) -> int:
    if cfg.sae.hook_layer is not None:
        return cfg.sae.hook_layer
    match = re.search(r"layers\.(\d+)", hook_name or "")
    if not match:
        raise ConfigError(f"sae.hook_layer: the SAE's hook_name {hook_name!r} names no layer; set sae.hook_layer")
    return int(match.group(1))


def check_against_model(cfg: RunConfig, meta: dict) -> None:
    """A d_in that is not the model's width is a config error, found before any work."""
    from transformers import AutoConfig

    model_cfg = AutoConfig.from_pretrained(model_source(cfg.model))
    if meta["d_in"] is not None and meta["d_in"] != model_cfg.hidden_size:
        raise ConfigError(f"sae: the SAE reads vectors of {meta['d_in']} (d_in) but model {cfg.model.name!r} "
                          f"has hidden size {model_cfg.hidden_size}; use an SAE trained on this model")
    if meta["layer"] is not None and meta["layer"] >= model_cfg.num_hidden_layers:
        raise ConfigError(f"sae.hook_layer: layer {meta['layer']} does not exist "
                          f"(model {cfg.model.name!r} has layers 0..{model_cfg.num_hidden_layers - 1})")


def load_sae(cfg: RunConfig, device: str):
    from sae_lens import SAE

    if cfg.sae.release:
        return SAE.from_pretrained(cfg.sae.release, cfg.sae.sae_id, device=device)
    return SAE.load_from_disk(local_sae_dir(cfg), device=device)


def train_sae(cfg: RunConfig, texts: list[str], device: str) -> dict:
    """Train a TopK SAE with sae-lens's runner on `texts`, offline, and save it.

    Returns the training summary: explained variance, mean L0, dead share."""
    import os

    os.environ.setdefault("WANDB_MODE", "disabled")  # before sae-lens imports wandb: offline, no prompts
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens import TopKTrainingSAEConfig
    from transformers import AutoConfig

    t, out = cfg.train_sae, default_sae_dir(cfg)
    source = model_source(cfg.model)
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
        checkpoint_path=str(out.parent / f".{out.name}.checkpoints"),
        output_path=None,
        n_batches_for_norm_estimate=10,
        # A short run: let TopK's auxiliary loss revive features after 100 quiet steps, not 1000.
        dead_feature_window=100,
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )
    start = time.time()
    corpus = datasets.Dataset.from_dict({"text": texts})
    runner = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=corpus,
                                            override_model=_hooked_truncated_model(cfg, device))
    sae = runner.run()
    seconds = time.time() - start
    summary = {**evaluate_sae(sae, runner.activations_store), "seconds": round(seconds, 1),
               "training_tokens": t.training_tokens, "layer": t.layer, "d_sae": t.d_sae, "k": t.k,
               "model": cfg.model.name, "n_texts": len(texts)}
    tmp = out.with_name(f"{out.name}.tmp")
    sae.save_model(tmp)
    (tmp / "training.json").write_text(json.dumps(summary, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("train-sae: %s in %.0fs: explained variance %.3f, mean L0 %.1f, dead %.1f%%", out, seconds,
             summary["explained_variance"], summary["mean_l0"], 100 * summary["dead_fraction"])
    return {**summary, "path": str(out)}


def _hooked_truncated_model(cfg: RunConfig, device: str):
    """The model as sae-lens's runner wants it, cut after the hook layer.

    Blocks past the hook and the 49k-wide lm_head are more than half the cost
    of a forward pass, and their output is never read: the runner only caches
    the hook's activations."""
    import torch
    from sae_lens.load_model import HookedProxyLM

    from raysel.models import load_model, load_tokenizer, truncate_to_layer

    model = load_model(cfg.model, device)
    truncate_to_layer(model, cfg.train_sae.layer)
    model.lm_head = torch.nn.Identity()
    return HookedProxyLM(model, load_tokenizer(cfg.model), hook_names=[f"model.layers.{cfg.train_sae.layer}"])


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
    return {"explained_variance": round(1 - sq_err / total_var, 4), "mean_l0": round(l0 / n, 2),
            "dead_fraction": round(1 - fired.float().mean().item(), 4), "eval_tokens": int(n)}
