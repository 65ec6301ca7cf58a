"""The generation engines: a prompt's samples from a causal LM, with transformers `generate` on Ray
actors (`Generator`), or through vLLM on GPU nodes (ray.data.llm's processor). FAC Synthesis
(core/synthesis.py) samples through them; each candidate carries its prompt and generator."""

from __future__ import annotations

import importlib.util
import logging
import time
from typing import TYPE_CHECKING

import pyarrow as pa

from raysel.core.models import ChatModel, generator_config, model_source
from raysel.core.section import ConfigError

if TYPE_CHECKING:
    from raysel.core.encoder import ModelStack
    from raysel.core.synthesis import SynthesisConfig

log = logging.getLogger(__name__)

GENERATED = pa.schema(
    [
        ("id", pa.string()),
        ("feature", pa.int64()),
        ("step", pa.int64()),
        ("prompt", pa.string()),
        ("text", pa.string()),
        ("generator", pa.string()),
    ]
)


class Generator:
    """`n` samples for each prompt of a batch (each row a prompt and how many samples it wants), from
    synthesis.generator with transformers `generate`."""

    def __init__(self, stack: ModelStack, synthesis: SynthesisConfig):
        import torch

        self.torch, self.s = torch, synthesis
        self.lm = ChatModel(stack, synthesis.generator)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([c for p in batch.to_pylist() for c in self.sample(p)], schema=GENERATED)

    def sample(self, p: dict) -> list[dict]:
        torch, lm, start = self.torch, self.lm, time.time()
        ids = torch.tensor([lm.prompt_ids(p["prompt"])], device=lm.device)
        torch.manual_seed(p["seed"])  # the same feature and step get the same samples
        with torch.inference_mode():
            out = lm.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=p.get("temperature", self.s.temperature),
                top_p=self.s.top_p,
                max_new_tokens=self.s.max_new_tokens,
                num_return_sequences=p["n"],
                pad_token_id=lm.pad_id,
            )
        texts = lm.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        log.info(
            "synthesize: feature %d, step %d: %d samples in %.0fs", p["feature"], p["step"], p["n"], time.time() - start
        )
        return [candidate(p, i, text, lm.name) for i, text in enumerate(texts)]


def candidate(p: dict, i: int, text: str, generator: str) -> dict:
    return {
        "id": f"synth-{p['feature']}-{p.get('attempt', p['step'])}-{i}",
        "feature": p["feature"],
        "step": p["step"],
        "prompt": p["prompt"],
        "text": text,
        "generator": generator,
    }


def generate_vllm(stack: ModelStack, synthesis: SynthesisConfig, prompts: list[dict]) -> pa.Table:
    """The same samples through vLLM on the GPU nodes (ray.data.llm), one request per sample, seeded."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    s, name = synthesis, generator_config(stack.model, synthesis.generator)
    processor = build_processor(
        vLLMEngineProcessorConfig(
            model_source=model_source(name),
            concurrency=s.actors,
            batch_size=64,
            engine_kwargs={"dtype": "auto", "max_model_len": 4096},
        ),
        preprocess=lambda r: {
            **r,
            "messages": [{"role": "user", "content": r["prompt"]}],
            "sampling_params": {
                "temperature": r.get("temperature", s.temperature),
                "top_p": s.top_p,
                "max_tokens": s.max_new_tokens,
                "seed": r["seed"] + r["i"],
            },
        },
        postprocess=lambda r: candidate(r, r["i"], r["generated_text"], name.name),
    )
    requests = [p | {"i": i} for p in prompts for i in range(p["n"])]
    return pa.Table.from_pylist(processor(ray.data.from_items(requests)).take_all(), schema=GENERATED)


def check_vllm() -> None:
    """synthesis.engine: vllm needs vLLM where the driver runs; say so before any work. Its engine actors
    ask Ray for GPUs and wait for them: what the cluster shows before its GPU workers join is no
    reason to refuse."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "synthesis.engine: 'vllm' needs the vllm package (pip install vllm, on GPU nodes); "
            "the allowed values are 'transformers' and 'vllm'"
        )
