"""FAC Synthesis: write new samples for the task features a dataset is missing.

For each missing feature j (from `raysel fac`, with its top-activating spans):

1. prompt a generator with the spans where j is strongest and sample n
   candidates; score each by g_j, the feature's max activation over the
   candidate (encoded like any sample); the best is x+ and the worst x-;
2. prompt again with the contrastive pair (x+, x- and their scores), sample m
   more, keep those with g_j > delta, and retain the top `keep`.

Generation and scoring run together on a Ray actor pool (a generator model with
transformers `generate`, plus the encoder); features are spread over the
actors. Every candidate, kept or not, is recorded with its provenance: feature,
step, prompt, score, generator, and whether it passed.
"""

from __future__ import annotations

import json
import logging
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from raysel.config import RunConfig
from raysel.encode import Encoder, model_resources
from raysel.models import generator_config, load_model, load_tokenizer
from raysel.records import chat_template_for
from raysel.stages import log_to_driver, map_stage

log = logging.getLogger(__name__)

FIRST = """Here are passages from instruction data, each with a marked span where one particular pattern is strong:

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


CANDIDATES = pa.schema([
    ("id", pa.string()), ("feature", pa.int64()), ("step", pa.int64()), ("prompt", pa.string()), ("text", pa.string()),
    ("record", pa.string()), ("score", pa.float64()), ("generator", pa.string()), ("passed", pa.bool_()),
    ("kept", pa.bool_()), ("feat_ids", pa.list_(pa.int32())), ("feat_max", pa.list_(pa.float32())),
    ("feat_sum", pa.list_(pa.float32())), ("n_tokens", pa.int32()),
])


def as_record(text: str) -> dict:
    """A generated text as an alpaca record; without the markers, the whole text is the instruction."""
    found = re.search(r"Instruction:\s*(.*?)\s*Response:\s*(.*)", text, flags=re.S)
    instruction, output = (found.group(1), found.group(2)) if found else (text, "")
    return {"instruction": instruction.strip(), "input": "", "output": output.strip()}


def passing(scores: list[float], delta: float, keep: int) -> list[int]:
    """Indices of the candidates above delta, strongest first, at most `keep`."""
    above = [i for i, s in enumerate(scores) if s > delta]
    return sorted(above, key=lambda i: (-scores[i], i))[:keep]


class Synthesizer:
    """Stage: each row is a missing feature with its spans; out come all its candidates with provenance."""

    def __init__(self, cfg: RunConfig, delta: float):
        import torch

        log_to_driver()
        self.torch, self.cfg, self.s, self.delta = torch, cfg, cfg.synth, delta
        self.encoder = Encoder(cfg)
        generator = generator_config(cfg.model, self.s.generator)
        self.generator_name = generator.name
        self.tokenizer = load_tokenizer(generator)
        self.model = load_model(generator, self.encoder.device)
        self.template = chat_template_for(self.tokenizer, cfg.prepare.chat_template)
        self.render_template = chat_template_for(self.encoder.tokenizer, cfg.prepare.chat_template)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for feature, spans in zip(batch["feature"].to_pylist(), batch["spans"].to_pylist()):
            rows += self.for_feature(feature, spans)
        return pa.Table.from_pylist(rows, schema=CANDIDATES)

    def for_feature(self, j: int, spans: list[str]) -> list[dict]:
        start = time.time()
        delta = self.delta
        first = FIRST.format(spans="\n\n".join(f"- {s}" for s in spans))
        step1 = self.candidates(j, 1, first, self.s.n_candidates)
        best, worst = max(step1, key=lambda c: c["score"]), min(step1, key=lambda c: c["score"])
        second = CONTRASTIVE.format(best=best["text"], best_score=best["score"], worst=worst["text"],
                                    worst_score=worst["score"])
        step2 = self.candidates(j, 2, second, self.s.n_contrastive)
        for c in step2:
            c["passed"] = c["score"] > delta
        kept = passing([c["score"] for c in step2], delta, self.s.keep)
        for i in kept:
            step2[i]["kept"] = True
        log.info("synthesize: feature %d: step 1 best %.2f, worst %.2f; step 2: %d of %d above delta %.2f, %d kept "
                 "(%.0fs)", j, best["score"], worst["score"], sum(c["passed"] for c in step2), len(step2), delta,
                 len(kept), time.time() - start)
        return step1 + step2

    def candidates(self, j: int, step: int, prompt: str, n: int) -> list[dict]:
        torch = self.torch
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 return_tensors="pt", chat_template=self.template, return_dict=True)
        ids = {k: v.to(self.encoder.device) for k, v in ids.items()}
        torch.manual_seed(self.s.seed * 1_000_003 + j * 10 + step)  # the same feature gets the same samples
        with torch.inference_mode():
            out = self.model.generate(**ids, do_sample=True, temperature=self.s.temperature, top_p=self.s.top_p,
                                      max_new_tokens=self.s.max_new_tokens, num_return_sequences=n,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        texts = self.tokenizer.batch_decode(out[:, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        records = [as_record(t) for t in texts]
        features = self.encoder([f"synth-{j}-{step}-{i}" for i in range(n)], [self.render(r) for r in records])
        scores = [dict(zip(f, m)).get(j, 0.0) for f, m in
                  zip(features["feat_ids"].to_pylist(), features["feat_max"].to_pylist())]
        return [{"id": f"synth-{j}-{step}-{i}", "feature": j, "step": step, "prompt": prompt, "text": texts[i],
                 "record": json.dumps(records[i]), "score": float(scores[i]), "generator": self.generator_name,
                 "passed": False, "kept": False, "feat_ids": features["feat_ids"][i].as_py(), "feat_max": features["feat_max"][i].as_py(),
                 "feat_sum": features["feat_sum"][i].as_py(), "n_tokens": features["n_tokens"][i].as_py()}
                for i in range(n)]

    def render(self, record: dict) -> str:
        messages = [{"role": "user", "content": record["instruction"] or " "},
                    {"role": "assistant", "content": record["output"] or " "}]
        return self.encoder.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.render_template)


def synthesize(cfg: RunConfig, missing: list[int], spans: pa.Table, delta: float) -> pa.Table:
    """Every candidate for the first synth.max_features missing features, on synth.actors actors; a
    step-2 candidate passes when its activation of the feature exceeds `delta`."""
    todo = missing[: cfg.synth.max_features]
    if not todo:
        return CANDIDATES.empty_table()
    texts = {j: ["".join(r["tokens"]) for r in spans.filter(pc.equal(spans["feature"], j)).to_pylist()[: cfg.synth.spans]]
             for j in todo}
    # one block per feature, made on the driver: a repartition task could wait forever for a CPU
    # that the actors, already started, hold
    jobs = ray.data.from_items([{"feature": j, "spans": texts[j]} for j in todo], override_num_blocks=len(todo))
    out = map_stage(jobs, Synthesizer, model_resources(cfg, min(cfg.synth.actors, len(todo))), cfg=cfg,
                    delta=delta)
    table = pa.concat_tables([CANDIDATES.empty_table(), *ray.get(out.to_arrow_refs())])
    return table.sort_by([("feature", "ascending"), ("step", "ascending"), ("id", "ascending")])


def acceptance(candidates: pa.Table) -> dict:
    """How many step-2 candidates cleared delta, and how many were kept."""
    step2 = candidates.filter(pc.equal(candidates["step"], 2))
    return {"n_candidates": candidates.num_rows, "n_kept": int(pc.sum(candidates["kept"]).as_py() or 0),
            "acceptance_rate": float(np.mean(step2["passed"].to_numpy(zero_copy_only=False))) if step2.num_rows else 0.0}
