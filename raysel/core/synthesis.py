"""FAC Synthesis, the two-step algorithm: new samples for the task features a dataset is missing.

For each missing feature j (from `raysel fac`, with its top-activating spans), the most common on
the anchor first:

1. prompt a generator with j's description (the FAC judge's label when it has one, else the
   tokens where j peaks) and the spans where j is strongest, peak token marked, and sample n
   candidates; score each by g_j, the feature's max activation over the candidate (encoded like
   any sample); the best is x+ and the worst x-. When every candidate scores 0, step 1 is redone
   once at synthesis.retry_temperature; still nothing, and j is recorded as `no_signal`;
2. prompt again with j's description and strongest span, as step 1, and the contrastive pair
   (x+, x- and their scores), sample m more, keep those with g_j > delta, and retain the top `keep`.

With synthesis.engine: transformers, synthesis.actors actors each hold the generator and the run's model
and SAE through every round: one generates a prompt's samples with transformers `generate` and
scores them itself, and each model loads once. With synthesis.engine: vllm (GPU nodes with vLLM
installed), ray.data.llm's vLLM processor generates each round, and actors holding the run's
model and SAE score what it wrote.
Every candidate, kept or not, is recorded with its provenance: feature, step, prompt, score,
generator, and whether it passed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from raysel.core.encoder import Encoder, ModelStack
from raysel.core.generation import Generator, generate_vllm
from raysel.core.judge import marked
from raysel.core.ray_adapter import held_actors, log_to_driver, model_resources
from raysel.core.records import chat_template_for
from raysel.core.section import Section

log = logging.getLogger(__name__)


class SynthesisConfig(Section):
    """The `synthesis` section (`raysel synthesize`): new samples for the features FAC finds missing (two steps, contrastive)."""

    generator: str | None = None
    """`raysel synthesize`'s generator: any causal LM (a directory, an HF id, the embedded default); `null`:
    `model.name`"""
    max_features: int = Field(20, gt=0)
    """missing features to write samples for, the most common on the anchor first"""
    spans: int = Field(5, gt=0)
    """top-activating spans of the feature shown to the generator in step 1"""
    n_candidates: int = Field(8, gt=0)
    """step 1: samples per feature, scored by the SAE for the contrastive pair"""
    n_contrastive: int = Field(8, gt=0)
    """step 2: samples from the contrastive prompt"""
    keep: int = Field(2, gt=0)
    """per feature, the strongest step-2 samples above δ"""
    delta: float | None = None
    """δ, the activation a kept sample must exceed; `null`: FAC's τ (`fac.tau`, or calibrated on the reference), the one
    stored with F"""
    temperature: float = Field(0.8, gt=0)
    """sampling temperature"""
    retry_temperature: float = Field(1.2, gt=0)
    """a feature whose step-1 samples all score 0 is sampled once more at this temperature; still 0, it is recorded in
    `no_signal` and gets no step 2"""
    top_p: float = Field(0.9, gt=0, le=1)
    """nucleus sampling"""
    max_new_tokens: int = Field(160, gt=0)
    """generation length"""
    seed: int = 0
    """sampling seed (per feature and step)"""
    actors: int = Field(1, gt=0)
    """actors that each hold the generator and the run's model and SAE for every round, and score what they generate
    (with `vllm`: engine replicas, and the samples are scored on `encode.actors`)"""
    engine: Literal["transformers", "vllm"] = "transformers"
    """`transformers`: `generate` on a Ray actor pool; `vllm`: ray.data.llm's vLLM processor on the GPU nodes (needs
    `pip install vllm` there; refused before any work without it or without GPUs)"""


FIRST = """Here are passages from instruction data where one particular pattern is strong; the token where it is strongest is marked [[like this]]. The pattern: {description}.

{spans}

Write one new instruction and the assistant's response in which this pattern is strong.
Answer in the form:
Instruction: <the instruction>
Response: <the response>"""

CONTRASTIVE = """We are writing instruction data that shows one particular pattern strongly. The pattern: {description}. Here it is in a passage, the token where it is strongest marked [[like this]]:
{span}

This example shows it strongly (score {best_score:.2f}):
{best}

This example barely shows it (score {worst_score:.2f}):
{worst}

Write one new instruction and response that shows the pattern even more strongly than the first example.
Answer in the form:
Instruction: <the instruction>
Response: <the response>"""


CANDIDATES = pa.schema(
    [
        ("id", pa.string()),
        ("feature", pa.int64()),
        ("step", pa.int64()),
        ("prompt", pa.string()),
        ("text", pa.string()),
        ("record", pa.string()),
        ("score", pa.float64()),
        ("generator", pa.string()),
        ("passed", pa.bool_()),
        ("kept", pa.bool_()),
        ("feat_ids", pa.list_(pa.int32())),
        ("feat_max", pa.list_(pa.float32())),
        ("feat_sum", pa.list_(pa.float32())),
        ("n_tokens", pa.int32()),
    ]
)


def as_record(text: str) -> dict:
    """A generated text as an alpaca record; without the markers, the whole text is the instruction."""
    found = re.search(r"Instruction:\s*(.*?)\s*Response:\s*(.*)", text, flags=re.S)
    instruction, output = (found.group(1), found.group(2)) if found else (text, "")
    return {"instruction": instruction.strip(), "input": "", "output": output.strip()}


def passing(scores: list[float], delta: float, keep: int) -> list[int]:
    """Indices of the candidates above delta, strongest first, at most `keep`."""
    above = [i for i, s in enumerate(scores) if s > delta]
    return sorted(above, key=lambda i: (-scores[i], i))[:keep]


class Scorer:
    """Generated samples in, as alpaca records, encoded, each scored by g_j of its own feature."""

    def __init__(self, stack: ModelStack):
        self.encoder = Encoder(stack)
        self.template = chat_template_for(self.encoder.tokenizer, stack.prepare.chat_template)

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = [as_record(t) for t in batch["text"].to_pylist()]
        features = self.encoder(batch["id"].to_pylist(), [self.render(r) for r in records])
        scores = [
            dict(zip(f, m)).get(j, 0.0)
            for j, f, m in zip(
                batch["feature"].to_pylist(), features["feat_ids"].to_pylist(), features["feat_max"].to_pylist()
            )
        ]
        n = batch.num_rows
        scored = batch.append_column("record", pa.array([json.dumps(r) for r in records]))
        for name, column in [
            ("score", pa.array(scores, pa.float64())),
            ("passed", pa.array([False] * n)),
            ("kept", pa.array([False] * n)),
            *zip(features.column_names[1:], features.columns[1:]),
        ]:
            scored = scored.append_column(name, column)
        return scored.select(CANDIDATES.names).cast(CANDIDATES)

    def render(self, record: dict) -> str:
        messages = [
            {"role": "user", "content": record["instruction"] or " "},
            {"role": "assistant", "content": record["output"] or " "},
        ]
        return self.encoder.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.template)


class Synthesizer:
    """Stage: prompts in, their samples out, each scored (a generator and the run's model and SAE on one
    actor); or, with synthesis.engine: vllm, samples vLLM generated in, scored."""

    def __init__(self, stack: ModelStack, synthesis: SynthesisConfig):
        log_to_driver()
        self.generate = Generator(stack, synthesis) if synthesis.engine == "transformers" else None
        self.score = Scorer(stack)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.score(batch if "text" in batch.column_names else self.generate(batch))


@contextlib.contextmanager
def sampler(
    stack: ModelStack, synthesis: SynthesisConfig, n_features: int
) -> Iterator[Callable[[list[dict]], list[dict]]]:
    """A function from a round's prompts to their scored candidates.

    transformers: synthesis.actors actors hold the generator and the run's model and SAE through every round,
    so each model loads once. vllm: each round, the engine's replicas generate first (ray.data.llm), then
    encode.actors actors score; both at once could wait forever for the same GPUs."""

    if synthesis.engine == "vllm":

        def vllm_round(prompts: list[dict]) -> list[dict]:
            generated = generate_vllm(stack, synthesis, prompts)
            size = max(1, -(-generated.num_rows // (4 * stack.encode.actors)))  # ceil: about 4 blocks an actor
            resources = model_resources(stack.encode, stack.encode.actors)
            with held_actors(Synthesizer, resources, stack=stack, synthesis=synthesis) as on_actors:
                return as_rows(on_actors([generated.slice(o, size) for o in range(0, generated.num_rows, size)]))

        yield vllm_round
        return
    resources = model_resources(stack.encode, min(synthesis.actors, n_features))
    with held_actors(Synthesizer, resources, stack=stack, synthesis=synthesis) as on_actors:
        yield lambda prompts: as_rows(on_actors([pa.Table.from_pylist([p]) for p in prompts]))  # a prompt a call


def as_rows(scored: list[pa.Table]) -> list[dict]:
    return pa.concat_tables([CANDIDATES.empty_table(), *scored]).to_pylist()


def synthesize(
    stack: ModelStack,
    synthesis: SynthesisConfig,
    missing: list[int],
    spans: pa.Table,
    delta: float,
    labels: dict[int, str],
) -> tuple[pa.Table, list[int]]:
    """Every candidate for the first synthesis.max_features of `missing` (in the order given), and the
    features step 1 found no signal for; a step-2 candidate passes when its activation exceeds `delta`."""
    s, todo = synthesis, missing[: synthesis.max_features]
    if not todo:
        return CANDIDATES.empty_table(), []

    def prompts(step: int, text: dict, n: int, features: list[int], **extra) -> list[dict]:
        return [
            {"feature": j, "step": step, "prompt": text[j], "n": n, "seed": s.seed * 1_000_003 + j * 10 + step} | extra
            for j in features
        ]

    briefs = {j: feature_brief(spans, j, s.spans, labels.get(j)) for j in todo}
    first_prompts = {j: FIRST.format(description=d, spans="\n\n".join(f"- {x}" for x in shown))
                     for j, (d, shown) in briefs.items()}  # fmt: skip
    with sampler(stack, synthesis, len(todo)) as sample:
        first = sample(prompts(1, first_prompts, s.n_candidates, todo))
        silent = [j for j in todo if not any(c["score"] > 0 for c in first if c["feature"] == j)]
        if silent:  # hotter sampling, once; a new seed and ids of its own
            log.info(
                "synthesize: features %s: every step-1 sample scored 0; retrying at %.2f", silent, s.retry_temperature
            )
            retry = prompts(1, first_prompts, s.n_candidates, silent, temperature=s.retry_temperature, attempt="1r")
            first += sample([p | {"seed": p["seed"] + 5} for p in retry])
        no_signal = [j for j in silent if not any(c["score"] > 0 for c in first if c["feature"] == j)]
        if no_signal:
            log.warning("synthesize: features %s: no step-1 sample activates them, even hotter: no_signal", no_signal)
        pairs = {}
        for j in (j for j in todo if j not in no_signal):
            mine = [c for c in first if c["feature"] == j]
            pairs[j] = max(mine, key=lambda c: c["score"]), min(mine, key=lambda c: c["score"])
        contrastive = {
            j: CONTRASTIVE.format(description=briefs[j][0], span=(briefs[j][1] or ["(none)"])[0], best=b["text"],
                                  best_score=b["score"], worst=w["text"], worst_score=w["score"])
            for j, (b, w) in pairs.items()
        }  # fmt: skip
        second = sample(prompts(2, contrastive, s.n_contrastive, list(pairs))) if pairs else []
    for j in pairs:
        judge_second_step(j, [c for c in second if c["feature"] == j], pairs[j], delta, s.keep)
    table = pa.Table.from_pylist(first + second, schema=CANDIDATES)
    return table.sort_by([("feature", "ascending"), ("step", "ascending"), ("id", "ascending")]), no_signal


def judge_second_step(j: int, mine: list[dict], pair: tuple[dict, dict], delta: float, keep: int) -> None:
    """Feature j's step-2 candidates marked in place: passed (score above delta), and the best `keep` kept."""
    mine.sort(key=lambda c: c["id"])
    for c in mine:
        c["passed"] = c["score"] > delta
    for i in passing([c["score"] for c in mine], delta, keep):
        mine[i]["kept"] = True
    log.info(
        "synthesize: feature %d: step 1 best %.2f, worst %.2f; step 2: %d of %d above delta %.2f, %d kept",
        j,
        pair[0]["score"],
        pair[1]["score"],
        sum(c["passed"] for c in mine),
        len(mine),
        delta,
        sum(c["kept"] for c in mine),
    )


def feature_brief(spans: pa.Table, feature: int, n: int, label: str | None) -> tuple[str, list[str]]:
    """What both steps' prompts say of a feature: its description (the judge's label, else the tokens
    where it peaks) and its n strongest spans, peak token marked (step 2 shows the first)."""
    top = spans.filter(pc.equal(spans["feature"], feature)).sort_by("rank").to_pylist()[:n]
    peaks = list(dict.fromkeys(r["tokens"][r["peak"]].strip() for r in top if r["tokens"][r["peak"]].strip()))
    description = label or ("it peaks on the tokens " + ", ".join(repr(t) for t in peaks) if peaks else "unknown")
    return description, [marked(r["tokens"], r["peak"]) for r in top]


def acceptance(candidates: pa.Table) -> dict:
    """How many step-2 candidates cleared delta, and how many were kept."""
    step2 = candidates.filter(pc.equal(candidates["step"], 2))
    return {
        "n_candidates": candidates.num_rows,
        "n_kept": int(pc.sum(candidates["kept"]).as_py() or 0),
        "acceptance_rate": float(np.mean(step2["passed"].to_numpy(zero_copy_only=False))) if step2.num_rows else 0.0,
    }
