"""FAC Synthesis: write new samples for the task features a dataset is missing.

For each missing feature j (from `raysel fac`, with its top-activating spans), the most common on
the anchor first:

1. prompt a generator with j's description (the FAC judge's label when it has one, else the
   tokens where j peaks) and the spans where j is strongest, peak token marked, and sample n
   candidates; score each by g_j, the feature's max activation over the candidate (encoded like
   any sample); the best is x+ and the worst x-. When every candidate scores 0, step 1 is redone
   once at synth.retry_temperature; still nothing, and j is recorded as `no_signal`;
2. prompt again with the contrastive pair (x+, x- and their scores), sample m
   more, keep those with g_j > delta, and retain the top `keep`.

With synth.engine: transformers, synth.actors actors each hold the generator and the run's model
and SAE through every round: one generates a prompt's samples with transformers `generate` and
scores them itself, and each model loads once. With synth.engine: vllm (GPU nodes with vLLM
installed), ray.data.llm's vLLM processor generates each round, and actors holding the run's
model and SAE score what it wrote.
Every candidate, kept or not, is recorded with its provenance: feature, step, prompt, score,
generator, and whether it passed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import re
import time
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from raysel.config import ModelStack, SynthConfig
from raysel.core import paths
from raysel.core.encoder import Encoder
from raysel.core.fac import FACConfig, fac
from raysel.core.features import FeatureStore, Profile
from raysel.core.judge import marked
from raysel.core.models import ChatModel, generator_config, model_source
from raysel.core.ray_adapter import held_actors, log_to_driver, model_resources
from raysel.core.records import chat_template_for
from raysel.core.section import ConfigError
from raysel.core.storage import Storage
from raysel.stages.base import Done, Stage
from raysel.stages.publish import records_of, write_selection

log = logging.getLogger(__name__)

FIRST = """Here are passages from instruction data where one particular pattern is strong; the token where it is strongest is marked [[like this]]. The pattern: {description}.

{spans}

Write one new instruction and the assistant's response in which this pattern is strong.
Answer in the form:
Instruction: <the instruction>
Response: <the response>"""

CONTRASTIVE = """We are writing instruction data that shows one particular pattern strongly.

This example shows it strongly (score {best_score:.2f}):
{best}

This example barely shows it (score {worst_score:.2f}):
{worst}

Write one new instruction and response that shows the pattern even more strongly than the first example.
Answer in the form:
Instruction: <the instruction>
Response: <the response>"""


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


class Generator:
    """`n` samples for each prompt of a batch (each row a prompt and how many samples it wants), from
    synth.generator with transformers `generate`."""

    def __init__(self, stack: ModelStack, synth: SynthConfig):
        import torch

        self.torch, self.s = torch, synth
        self.lm = ChatModel(stack, synth.generator)

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


def generate_vllm(stack: ModelStack, synth: SynthConfig, prompts: list[dict]) -> pa.Table:
    """The same samples through vLLM on the GPU nodes (ray.data.llm), one request per sample, seeded."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    s, name = synth, generator_config(stack.model, synth.generator)
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
    """synth.engine: vllm needs vLLM where the driver runs and GPUs in the cluster; say so before any work."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "synth.engine: 'vllm' needs the vllm package (pip install vllm, on GPU nodes); "
            "the allowed values are 'transformers' and 'vllm'"
        )
    if not ray.cluster_resources().get("GPU"):
        raise ConfigError("synth.engine: 'vllm' runs on GPU nodes and this cluster has none; use 'transformers'")


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
    actor); or, with synth.engine: vllm, samples vLLM generated in, scored."""

    def __init__(self, stack: ModelStack, synth: SynthConfig):
        log_to_driver()
        self.generate = Generator(stack, synth) if synth.engine == "transformers" else None
        self.score = Scorer(stack)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.score(batch if "text" in batch.column_names else self.generate(batch))


@contextlib.contextmanager
def sampler(stack: ModelStack, synth: SynthConfig, n_features: int) -> Iterator[Callable[[list[dict]], list[dict]]]:
    """A function from a round's prompts to their scored candidates.

    transformers: synth.actors actors hold the generator and the run's model and SAE through every round,
    so each model loads once. vllm: each round, the engine's replicas generate first (ray.data.llm), then
    encode.actors actors score; both at once could wait forever for the same GPUs."""

    if synth.engine == "vllm":

        def vllm_round(prompts: list[dict]) -> list[dict]:
            generated = generate_vllm(stack, synth, prompts)
            size = max(1, -(-generated.num_rows // (4 * stack.encode.actors)))  # ceil: about 4 blocks an actor
            resources = model_resources(stack.encode, stack.encode.actors)
            with held_actors(Synthesizer, resources, stack=stack, synth=synth) as on_actors:
                return as_rows(on_actors([generated.slice(o, size) for o in range(0, generated.num_rows, size)]))

        yield vllm_round
        return
    resources = model_resources(stack.encode, min(synth.actors, n_features))
    with held_actors(Synthesizer, resources, stack=stack, synth=synth) as on_actors:
        yield lambda prompts: as_rows(on_actors([pa.Table.from_pylist([p]) for p in prompts]))  # a prompt a call


def as_rows(scored: list[pa.Table]) -> list[dict]:
    return pa.concat_tables([CANDIDATES.empty_table(), *scored]).to_pylist()


def synthesize(
    stack: ModelStack, synth: SynthConfig, missing: list[int], spans: pa.Table, delta: float, labels: dict[int, str]
) -> tuple[pa.Table, list[int]]:
    """Every candidate for the first synth.max_features of `missing` (in the order given), and the
    features step 1 found no signal for; a step-2 candidate passes when its activation exceeds `delta`."""
    s, todo = synth, missing[: synth.max_features]
    if not todo:
        return CANDIDATES.empty_table(), []

    def prompts(step: int, text: dict, n: int, features: list[int], **extra) -> list[dict]:
        return [
            {"feature": j, "step": step, "prompt": text[j], "n": n, "seed": s.seed * 1_000_003 + j * 10 + step} | extra
            for j in features
        ]

    first_prompts = {j: first_prompt(spans, j, s.spans, labels.get(j)) for j in todo}
    with sampler(stack, synth, len(todo)) as sample:
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
            j: CONTRASTIVE.format(best=b["text"], best_score=b["score"], worst=w["text"], worst_score=w["score"])
            for j, (b, w) in pairs.items()
        }
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


def first_prompt(spans: pa.Table, feature: int, n: int, label: str | None) -> str:
    """Step 1's prompt: the feature's description (the judge's label, else the tokens where it peaks)
    and its n strongest spans, peak token marked."""
    top = spans.filter(pc.equal(spans["feature"], feature)).sort_by("rank").to_pylist()[:n]
    peaks = list(dict.fromkeys(r["tokens"][r["peak"]].strip() for r in top if r["tokens"][r["peak"]].strip()))
    description = label or ("it peaks on the tokens " + ", ".join(repr(t) for t in peaks) if peaks else "unknown")
    return FIRST.format(description=description, spans="\n\n".join(f"- {marked(r['tokens'], r['peak'])}" for r in top))


def judged_labels(storage) -> dict[int, str]:
    """The FAC judge's label of each feature it described, when F came from the judge."""
    if not storage.exists(f"{paths.FAC}/judged.parquet"):
        return {}
    verdicts = pq.read_table(
        storage.path(paths.FAC, "judged.parquet"), columns=["feature", "label"], filesystem=storage.fs
    )
    return {j: label for j, label in zip(verdicts["feature"].to_pylist(), verdicts["label"].to_pylist()) if label}


def acceptance(candidates: pa.Table) -> dict:
    """How many step-2 candidates cleared delta, and how many were kept."""
    step2 = candidates.filter(pc.equal(candidates["step"], 2))
    return {
        "n_candidates": candidates.num_rows,
        "n_kept": int(pc.sum(candidates["kept"]).as_py() or 0),
        "acceptance_rate": float(np.mean(step2["passed"].to_numpy(zero_copy_only=False))) if step2.num_rows else 0.0,
    }


def synth_delta(synth: SynthConfig, tau: float) -> float:
    """synth.delta, or the run's tau as resolved (calibrated, when activation.target_active sets it)."""
    return tau if synth.delta is None else synth.delta


class Synthesize(Stage):
    """`raysel synthesize`: FAC of the input (the fac stage's report, `before`), then new samples for its
    missing features, written like a selection under selection/synthesis/ (records carry their
    provenance), with FAC before and after."""

    name = "synthesis"
    needs = ("stats", "fac")
    brief = ("n_kept", "fac_before", "fac_after")

    def __init__(self, synth: SynthConfig, fac: FACConfig, stack: ModelStack, storage: Storage, run: dict):
        """`run`: what the synthesis's manifest carries of the run (its config)."""
        self.synth, self.fac, self.stack, self.storage, self.run_info = synth, fac, stack, storage, run

    def side_sets(self) -> dict[str, list[str]]:
        return {"anchor": self.fac.anchor}

    def key(self, done: Done) -> dict | None:
        return None  # a costly generator, but asking for it again means sampling again

    def run(self, done: Done) -> dict:
        synth, storage, before = self.synth, self.storage, done["fac"]
        tau, d_sae = done["stats"]["tau"], done["stats"]["d_sae"]
        start = time.time()
        spans = pq.read_table(storage.path(paths.FAC, "missing_spans.parquet"), filesystem=storage.fs)
        delta = synth_delta(synth, tau)
        table = pq.read_table(storage.path(paths.FAC, "features.parquet"), filesystem=storage.fs)
        share = dict(zip(table["feature"].to_pylist(), table["anchor_share"].to_pylist()))
        missing = sorted(before["missing"], key=lambda j: (-share[j], j))  # the most common on the anchor first
        candidates, no_signal = synthesize(self.stack, synth, missing, spans, delta, judged_labels(storage))
        kept = candidates.filter(candidates["kept"])
        anchored = FeatureStore(storage.child("anchor")).profile(tau, d_sae)
        features = table["feature"].to_numpy()
        grown = FeatureStore(storage).profile(tau, d_sae).merge(Profile.of(kept, tau, d_sae))
        after, _ = fac(anchored, grown, features)
        storage.fs.create_dir(storage.path(paths.SYNTHESIS), recursive=True)
        pq.write_table(
            candidates.drop_columns(["feat_ids", "feat_max", "feat_sum", "n_tokens"]),
            storage.path(paths.SYNTHESIS, "candidates.parquet"),
            filesystem=storage.fs,
        )
        seconds = time.time() - start
        summary = {
            "delta": delta,
            "fac_before": before["fac"],
            "fac_after": after["fac"],
            "missing_before": len(before["missing"]),
            "missing_after": len(after["missing"]),
            "features_tried": len(set(candidates["feature"].to_pylist())),
            "no_signal": no_signal,
            **acceptance(candidates),
            "seconds_per_kept": round(seconds / kept.num_rows, 1) if kept.num_rows else None,
        }
        records = {
            r["id"]: json.dumps(
                json.loads(r["record"])
                | {"provenance": {k: r[k] for k in ("feature", "step", "prompt", "score", "generator")}}
            )
            for r in kept.to_pylist()
        }
        write_selection(
            storage,
            "synthesis",
            kept["id"].to_pylist(),
            kept["score"].to_numpy(),
            np.zeros(kept.num_rows, np.int64),
            records_of(kept["id"].to_pylist(), records),
            {
                "config": self.run_info["config"],
                "method": "synthesis",
                "tau": tau,
                **summary,
                "counts": {"n_selected": kept.num_rows},
            },
        )
        log.info(
            "synthesis: FAC %.3f -> %.3f; %d of %d step-2 candidates above delta (%.0f %%), %d kept, %.1fs",
            summary["fac_before"],
            summary["fac_after"],
            round(summary["acceptance_rate"] * synth.n_contrastive * summary["features_tried"]),
            synth.n_contrastive * summary["features_tried"],
            100 * summary["acceptance_rate"],
            kept.num_rows,
            seconds,
        )
        return summary
