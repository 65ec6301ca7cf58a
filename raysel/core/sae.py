"""Finding, checking and loading the SAE. sae-lens is imported lazily: it costs seconds to
import, and most commands never touch it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from raysel.core.models import model_source
from raysel.core.section import ConfigError, Section

if TYPE_CHECKING:
    from raysel.core.encoder import ModelStack


class SAESection(Section):
    """Which SAE reads the model: a saved one, a published one, or the default
    that `raysel train-sae` makes for the configured model."""

    path: str | None = None
    """a saved sae-lens SAE (a local dir or any location URI, fetched once into `model.cache_dir`; safetensors only);
    `null`: the default SAE of `train_sae`"""
    format: Literal["auto", "sae_lens", "sparsify"] = "auto"
    """`sae_lens` (cfg.json + sae_weights.safetensors), `sparsify` (EleutherAI sparsify: cfg.json + sae.safetensors in a
    folder named for its hookpoint, e.g. `layers.15`); `auto`: told by the weights file"""
    release: str | None = None
    """a sae-lens pretrained release (Gemma Scope, Llama Scope, ...), with `sae.sae_id`: through `SAE.from_pretrained`,
    from the Hub or the HF cache"""
    sae_id: str | None = None
    """the SAE's id within `sae.release`"""
    hook_layer: int | None = Field(None, ge=0)
    """the block whose output the SAE reads; `null`: from the SAE's hook name, one of `model.layers.L` / `layers.L` (HF,
    sparsify) and `blocks.L.hook_resid_post` (the output of block L) or `blocks.L.hook_resid_pre` (its input: block
    L−1's output, the embeddings for L = 0) from TransformerLens; any other hook is refused"""
    allow_poor_fit: bool = False
    """encode even when the fit check finds the SAE's explained variance below 0 on the first samples"""

    @model_validator(mode="after")
    def _one_source(self):
        if self.path and self.release:
            raise ValueError("sae: set sae.path or sae.release, not both")
        if bool(self.release) != bool(self.sae_id):
            raise ValueError("sae: sae.release and sae.sae_id go together")
        return self


class TrainSAEConfig(Section):
    """`raysel train-sae`: a TopK SAE trained with sae-lens on the prepared corpus."""

    layer: int = Field(15, ge=0)
    """the default SAE reads the residual stream after this block"""
    d_sae: int = Field(2048, gt=0)
    """features"""
    k: int = Field(32, gt=0)
    """TopK: features active per token"""
    training_tokens: int = Field(120_000, gt=0)
    """sized to train in under 3 minutes on 2 CPU cores"""
    context_size: int = Field(256, gt=0)
    """tokens per training context"""
    batch_size_tokens: int = Field(256, gt=0)
    """tokens per optimiser step"""
    lr: float = Field(1e-3, gt=0)
    """the learning rate"""
    seed: int = 42
    """the training seed, and the seeded order of the prepared rows (by their ids) that it trains on"""
    output: str | None = None
    """where the default SAE is saved and where runs without `sae.path` find it: a folder, or `s3://...` on a cluster
    (every node reads it); `null`: the model cache"""


log = logging.getLogger(__name__)

WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"  # EleutherAI sparsify's checkpoint: cfg.json + sae.safetensors per hookpoint
SAE_CONFIG = "cfg.json"
PICKLED = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


SHIPPED = Path(__file__).resolve().parents[1] / "data" / "sae"  # default SAEs that ship with raysel
TRAINING = "training.json"  # train-sae's record beside the weights: its settings and figures
MAKE_SHIPPED = (
    "raysel train-sae raysel/configs/demo.yaml --set input.paths='[\"raysel/data/demo.jsonl\"]' "
    "--set encode.num_cpus=2 --set output.root=runs/default-sae --set train_sae.output=raysel/data/sae/{name}"
)  # the command that made a shipped SAE, run from the repository root


def default_sae_name(stack: ModelStack) -> str:
    t = stack.train_sae
    slug = re.sub(r"[^A-Za-z0-9]+", "-", stack.model.name).strip("-").lower()
    return f"{slug}-L{t.layer}-topk{t.k}-{t.d_sae}"


def default_sae_location(stack: ModelStack) -> str:
    """Where `raysel train-sae` puts the SAE that runs use when none is configured: train_sae.output (a
    folder, or s3:// and the like on a cluster, where every node reads it), else the model cache."""
    t = stack.train_sae
    if t.output:
        return t.output if "://" in t.output else str(Path(t.output).expanduser())
    return str(Path(stack.model.cache_dir).expanduser() / "saes" / default_sae_name(stack))


def shipped_sae(stack: ModelStack) -> Path | None:
    """The default SAE shipped with raysel for this model, when train-sae's settings here are the ones it
    was trained with (its training.json says; MAKE_SHIPPED remakes it) and train_sae.output names none."""
    path = SHIPPED / default_sae_name(stack)
    if stack.train_sae.output or not (path / TRAINING).is_file():
        return None
    made = json.loads((path / TRAINING).read_text())
    same = made["model"] == stack.model.name and made["train_sae"] == stack.train_sae.model_dump(exclude={"output"})
    return path if same else None


def default_sae_source(stack: ModelStack) -> str | None:
    """Where runs read the default SAE: what train-sae made for this model and its settings, else the one
    shipped with raysel; None when there is neither (a run then trains it first)."""
    location = default_sae_location(stack)
    if "://" in location:
        from raysel.core.storage import filesystem_for

        fs, path = filesystem_for(location, stack.s3)
        trained = fs.get_file_info(f"{path}/{WEIGHTS}").is_file
    else:
        trained = (Path(location) / WEIGHTS).is_file()
    if trained:
        return location
    shipped = shipped_sae(stack)
    return str(shipped) if shipped else None


def sae_identity(stack: ModelStack, path: Path) -> str:
    """The SAE's name in records, given the folder it was read from: sae.path, where train-sae put the
    default SAE, or the shipped SAE's name (not the installed package's path, which moves with every
    install)."""
    if stack.sae.path:
        return stack.sae.path
    return f"raysel's shipped {path.name}" if path.parent == SHIPPED else default_sae_location(stack)


def local_sae_dir(stack: ModelStack) -> Path:
    """The SAE's directory on this machine; a remote one (s3://, gs://, file://) fetched into the cache."""
    if stack.sae.path is None:
        source = default_sae_source(stack)
        if source is None:
            raise ConfigError(
                f"sae.path: not set, and no default SAE at {default_sae_location(stack)}; run `raysel "
                f"train-sae CONFIG` first, or set sae.path (a saved SAE) or sae.release and sae.sae_id"
            )
        return _fetch_remote(stack, source) if "://" in source else Path(source)
    if "://" in stack.sae.path:
        return _fetch_remote(stack, stack.sae.path)
    path = Path(stack.sae.path).expanduser()
    pickled = [p.name for p in (path.glob("*") if path.is_dir() else [path]) if p.suffix in PICKLED]
    if pickled and not (path / WEIGHTS).is_file():
        raise ConfigError(
            f"sae.path: {stack.sae.path!r} holds pickled weights ({', '.join(pickled)}); raysel loads "
            f"SAEs from safetensors only, since unpickling runs code: save it with sae-lens as {WEIGHTS}"
        )
    if not (path / SAE_CONFIG).is_file() or not any((path / w).is_file() for w in (WEIGHTS, SPARSIFY_WEIGHTS)):
        raise ConfigError(
            f"sae.path: {stack.sae.path!r} holds no saved SAE ({SAE_CONFIG} with {WEIGHTS} from sae-lens, "
            f"or with {SPARSIFY_WEIGHTS} from EleutherAI sparsify, expected)"
        )
    return path


def sae_format(stack: ModelStack, path: Path) -> str:
    """sae_lens or sparsify: as configured, else told by the weights file the directory holds."""
    if stack.sae.format != "auto":
        return stack.sae.format
    return "sparsify" if (path / SPARSIFY_WEIGHTS).is_file() and not (path / WEIGHTS).is_file() else "sae_lens"


def weights_file(stack: ModelStack) -> Path:
    path = local_sae_dir(stack)
    return path / (SPARSIFY_WEIGHTS if sae_format(stack, path) == "sparsify" else WEIGHTS)


def sparsify_config(stack: ModelStack, path: Path) -> dict:
    """A sparsify checkpoint's config as sae-lens's TopK SAE takes it. Its hookpoint is the folder's
    name (`layers.15`), as sparsify saves one folder per hookpoint."""
    cfg = json.loads((path / SAE_CONFIG).read_text())
    if cfg.get("activation", "topk") != "topk" or cfg.get("transcode"):
        raise ConfigError(
            f"sae.path: {stack.sae.path!r} is a sparsify {'transcoder' if cfg.get('transcode') else cfg['activation']} "
            f"checkpoint; raysel reads sparsify's TopK SAEs"
        )
    hookpoint = (stack.sae.path or str(path)).rstrip("/").rsplit("/", 1)[-1]
    return {"d_in": cfg["d_in"], "d_sae": cfg.get("num_latents") or cfg["d_in"] * cfg["expansion_factor"],
            "k": cfg["k"], "hook_name": hookpoint}  # fmt: skip


def weights_digest(stack: ModelStack) -> str:
    """A hash of the SAE's weights file (a few seconds for a 131k-latent SAE), or of its release and
    id for one that sae-lens fetches itself."""
    if stack.sae.release:
        return f"{stack.sae.release}/{stack.sae.sae_id}"
    h = hashlib.sha256()
    with open(weights_file(stack), "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:16]


def check_safetensors(weights: Path) -> None:
    """Read the weights' header: a file that only bears the name is refused before any work."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for bad headers
        raise ConfigError(
            f"sae.path: {weights} is not a safetensors file ({err}); raysel loads SAEs from safetensors only"
        ) from None


def _fetch_remote(stack: ModelStack, uri: str) -> Path:
    """A remote SAE's copy in the cache, under its path's hash. It is fetched again when a remote file's
    size or time is not what the copy recorded (an SAE retrained under the same URI); each file lands
    by rename and the record is written last, so actors sharing a node never read half a copy."""
    import pyarrow.fs as pafs

    from raysel.core.storage import filesystem_for

    target = Path(stack.model.cache_dir).expanduser() / "saes" / "remote"
    target /= hashlib.sha256(uri.encode()).hexdigest()[:16]
    fs, path = filesystem_for(uri, stack.s3)
    infos = {i.base_name: i for i in fs.get_file_info([f"{path}/{n}" for n in (SAE_CONFIG, WEIGHTS, SPARSIFY_WEIGHTS)])}
    weights = [n for n in (WEIGHTS, SPARSIFY_WEIGHTS) if infos[n].is_file][:1]
    if not infos[SAE_CONFIG].is_file or not weights:
        raise ConfigError(f"sae.path: {uri!r} holds no saved SAE ({SAE_CONFIG} with {WEIGHTS} expected)")
    present = [SAE_CONFIG, *weights]
    stamp = {n: [infos[n].size, str(infos[n].mtime)] for n in present}
    record = target / "remote.json"
    if record.is_file() and json.loads(record.read_text()) == stamp:
        return target
    target.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)
    for name in present:
        part = target / f"{name}.{os.getpid()}.part"
        pafs.copy_files(
            f"{path}/{name}", str(part), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        part.replace(target / name)
    record.write_text(json.dumps(stamp))
    return target


def sae_metadata(stack: ModelStack) -> dict:
    """d_in, width, hook layer and architecture of the configured SAE, read without loading its weights."""
    if stack.sae.release:
        return release_metadata(stack)
    path = local_sae_dir(stack)
    check_safetensors(weights_file(stack))
    if sae_format(stack, path) == "sparsify":
        cfg = sparsify_config(stack, path)
        meta = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "architecture": "topk (sparsify)"}
        return {
            **meta,
            "layer": hook_layer(stack, cfg["hook_name"]),
            "identity": sae_identity(stack, path),
        }
    meta = json.loads((path / SAE_CONFIG).read_text())
    hook_name = (meta.get("metadata") or {}).get("hook_name") or meta.get("hook_name")
    return {
        "d_in": meta["d_in"],
        "d_sae": meta["d_sae"],
        "layer": hook_layer(stack, hook_name),
        "identity": sae_identity(stack, path),
        "architecture": meta.get("architecture"),
    }


def release_metadata(stack: ModelStack) -> dict:
    """A sae-lens release's config, read the way SAE.from_pretrained reads it (the Hub, or its files
    in the HF cache with HF_HUB_OFFLINE=1), without its weights."""
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    release, sae_id = stack.sae.release, stack.sae.sae_id
    try:
        cfg = load_sae_config_from_huggingface(release, sae_id)
    except (OSError, ValueError) as err:  # not in the registry, no Hub and no cache, a bad id
        raise ConfigError(
            f"sae.release: cannot read the config of {release}/{sae_id}: {err}. sae-lens needs the Hub "
            f"for it, or its files in the HF cache (HF_HUB_OFFLINE=1)"
        ) from None
    hook_name = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    return {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "layer": hook_layer(stack, hook_name),
            "identity": f"{release}/{sae_id}", "architecture": cfg.get("architecture")}  # fmt: skip


# The residual-stream hook names raysel reads, each to the block whose output it is (-1: the
# embeddings, what block 0 reads).
HOOK_FORMS = (
    (re.compile(r"^(?:model\.)?layers\.(\d+)$"), 0),  # HF module paths (sae-lens on HF models), sparsify hookpoints
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 0),  # TransformerLens: the output of block L
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), -1),  # TransformerLens: the input of block L
)
SUPPORTED_HOOKS = "model.layers.L, layers.L, blocks.L.hook_resid_post, blocks.L.hook_resid_pre"


def hook_layer(stack: ModelStack, hook_name: str | None) -> int:
    """The block whose output the SAE reads, from its hook name; -1 means the embeddings.
    `sae.hook_layer` overrides it (a block index)."""
    if stack.sae.hook_layer is not None:
        return stack.sae.hook_layer
    for form, shift in HOOK_FORMS:
        if match := form.match(hook_name or ""):
            return int(match.group(1)) + shift
    raise ConfigError(
        f"sae: the SAE's hook {hook_name!r} is not a residual-stream point raysel reads (supported: "
        f"{SUPPORTED_HOOKS}; attention, MLP-out and other hooks are not); set sae.hook_layer to read "
        f"the output of a block anyway"
    )


def check_against_model(stack: ModelStack, meta: dict) -> None:
    """A d_in that is not the model's width is a config error, found before any work."""
    from transformers import AutoConfig

    model_cfg = AutoConfig.from_pretrained(model_source(stack.model))
    if meta["d_in"] is not None and meta["d_in"] != model_cfg.hidden_size:
        raise ConfigError(
            f"sae: the SAE reads vectors of {meta['d_in']} (d_in) but model {stack.model.name!r} "
            f"has hidden size {model_cfg.hidden_size}; use an SAE trained on this model"
        )
    if meta["layer"] is not None and not -1 <= meta["layer"] < model_cfg.num_hidden_layers:
        raise ConfigError(
            f"sae.hook_layer: layer {meta['layer']} does not exist "
            f"(model {stack.model.name!r} has layers 0..{model_cfg.num_hidden_layers - 1})"
        )


def load_sae(stack: ModelStack, device: str):
    from sae_lens import SAE

    if stack.sae.release:
        return SAE.from_pretrained(stack.sae.release, stack.sae.sae_id, device=device)
    path = local_sae_dir(stack)
    if sae_format(stack, path) == "sparsify":
        return load_sparsify(stack, path, device)
    return SAE.load_from_disk(path, device=device)


def load_sparsify(stack: ModelStack, path: Path, device: str):
    """A sparsify TopK checkpoint as sae-lens's TopK SAE, which encodes the same way: subtract b_dec,
    the encoder's affine map, the k largest, ReLU. Its encoder is stored as nn.Linear (d_sae x d_in)."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from safetensors.torch import load_file

    cfg = sparsify_config(stack, path)
    weights = load_file(str(path / SPARSIFY_WEIGHTS))
    sae = TopKSAE(TopKSAEConfig(d_in=cfg["d_in"], d_sae=cfg["d_sae"], k=cfg["k"], device=device,
                                dtype=str(weights["encoder.weight"].dtype).removeprefix("torch."),
                                metadata=SAEMetadata(hook_name=cfg["hook_name"])))  # fmt: skip
    state = {"W_enc": weights["encoder.weight"].T, "b_enc": weights["encoder.bias"], "b_dec": weights["b_dec"],
             "W_dec": weights.get("W_dec", weights["encoder.weight"])}  # fmt: skip
    sae.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    return sae.to(device)
