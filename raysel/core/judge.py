"""FAC's LLM judge of task-relevant features: the paper's explain -> verify -> judge relevance.

Each feature of a shortlist is shown to a generator (any HF causal LM: fac.judge_generator, by
default the run's model) through its top-activating spans, the peak token marked [[so]]:

1. explain: the generator writes a short label for what the feature detects (greedy decoding);
2. verify: does the label fit the spans? Yes or No;
3. judge: how relevant is a feature that detects the label to the task (fac.judge_task)?
   Yes, Probably, Maybe or No.

Steps 2 and 3 take the allowed answer with the highest log-likelihood after the prompt, so even a
small model gives a well-formed verdict. A verified feature judged fac.judge_keep or better
(Maybe, as in the paper) joins F. The judge runs as a Ray actor pool, like the encoder.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pyarrow as pa

from raysel.core.models import ChatModel
from raysel.core.ray_adapter import log_to_driver, map_stage, model_resources

if TYPE_CHECKING:
    from raysel.core.encoder import ModelStack
    from raysel.core.fac import FACConfig

log = logging.getLogger(__name__)

LEVELS = ["No", "Maybe", "Probably", "Yes"]  # weakest first
EXPLAIN = (
    "Below are text snippets where one feature of a language model fires most strongly; the token where it "
    "fires hardest is marked [[like this]].\n\n{spans}\n\nIn a few words, what does this feature detect? "
    "Answer with the description only."
)
VERIFY = (
    'Snippets, with the strongest token marked [[like this]]:\n\n{spans}\n\nDoes the description "{label}" '
    "fit what the marked tokens have in common? Answer Yes or No."
)
JUDGE = (
    'Task: {task}\n\nA feature of a language model detects: "{label}". Is this feature relevant to the task? '
    "Answer Yes, Probably, Maybe or No."
)
VERDICTS = pa.schema(
    [
        ("feature", pa.int32()),
        ("label", pa.string()),
        ("verified", pa.bool_()),
        ("relevance", pa.string()),
        ("relevance_logprobs", pa.list_(pa.float32())),
        ("explain_prompt", pa.string()),
        ("generator", pa.string()),
        ("reason", pa.string()),  # why a feature was judged No without asking, else null
    ]
)


def marked(tokens: list[str], peak: int) -> str:
    return "".join(tokens[:peak]) + "[[" + tokens[peak] + "]]" + "".join(tokens[peak + 1 :])


def kept(verdicts: pa.Table, keep: str) -> list[int]:
    """The verified features judged `keep` or better."""
    floor = LEVELS.index(keep.capitalize())
    return sorted(r["feature"] for r in verdicts.to_pylist() if r["verified"] and LEVELS.index(r["relevance"]) >= floor)


class Judge:
    """Stage: rows (feature, spans) in, one verdict per feature out."""

    def __init__(self, stack: ModelStack, cfg: FACConfig):
        import torch

        log_to_driver()
        self.torch, self.cfg = torch, cfg
        self.lm = ChatModel(stack, cfg.judge_generator)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.judge(j, spans) for j, spans in zip(batch["feature"].to_pylist(), batch["spans"].to_pylist())]
        return pa.Table.from_pylist(rows, schema=VERDICTS)

    def judge(self, feature: int, spans: list[str]) -> dict:
        shown = "\n".join(f"- {s}" for s in spans)
        explain = EXPLAIN.format(spans=shown)
        lines = self.generate(explain).strip().splitlines() if spans else []
        label = lines[0].strip(" .\"'")[:200] if lines else ""
        verdict = {"feature": feature, "label": label, "explain_prompt": explain, "generator": self.lm.name}
        if not label:  # nothing to verify or judge: No, and why
            reason = "the generator wrote no description" if spans else "the feature has no spans to show"
            log.info("judge: feature %d: No, %s", feature, reason)
            return verdict | {"verified": False, "relevance": "No", "relevance_logprobs": [], "reason": reason}
        verified, _ = self.choose(VERIFY.format(spans=shown, label=label), ["Yes", "No"])
        relevance, logprobs = self.choose(JUDGE.format(task=self.cfg.judge_task, label=label), LEVELS)
        log.info("judge: feature %d: %r, verified %s, relevance %s", feature, label, verified, relevance)
        return verdict | {"verified": verified == "Yes", "relevance": relevance, "relevance_logprobs": logprobs}

    def generate(self, prompt: str) -> str:
        torch, lm = self.torch, self.lm
        ids = torch.tensor([lm.prompt_ids(prompt)], device=lm.device)
        with torch.inference_mode():
            out = lm.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=24,
                pad_token_id=lm.pad_id,
            )
        return lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def choose(self, prompt: str, options: list[str]) -> tuple[str, list[float]]:
        """The option the model finds likeliest as the answer, and each option's log-likelihood."""
        torch, lm = self.torch, self.lm
        base = lm.prompt_ids(prompt)
        scores = []
        for option in options:
            ids = lm.tokenizer(option, add_special_tokens=False)["input_ids"]
            x = torch.tensor([base + ids], device=lm.device)
            with torch.inference_mode():
                logp = lm.model(input_ids=x).logits[0, len(base) - 1 : -1].float().log_softmax(-1)
            scores.append(float(logp[torch.arange(len(ids)), torch.tensor(ids, device=lm.device)].sum()))
        return options[max(range(len(options)), key=scores.__getitem__)], scores


def judge_features(stack: ModelStack, cfg: FACConfig, spans: pa.Table, features: list[int]) -> pa.Table:
    """A verdict for each feature, from its top spans (at most stats.top_n), on fac.judge actors."""
    import ray

    shown = {j: [] for j in features}
    for r in spans.sort_by([("feature", "ascending"), ("rank", "ascending")]).to_pylist():
        if r["feature"] in shown:
            shown[r["feature"]].append(marked(r["tokens"], r["peak"]))
    items = ray.data.from_items(
        [{"feature": j, "spans": shown[j]} for j in features], override_num_blocks=max(1, len(features))
    )
    out = map_stage(
        items,
        Judge,
        model_resources(stack.encode, min(stack.encode.actors, max(1, len(features)))),
        stack=stack,
        cfg=cfg,
    )
    return pa.concat_tables([VERDICTS.empty_table(), *ray.get(out.to_arrow_refs())]).sort_by("feature")
