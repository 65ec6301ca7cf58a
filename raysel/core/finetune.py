"""Proxy fine-tunes: a LoRA adapter trained on one selection with TRL's SFTTrainer, and a model's
loss (and, optionally, exact match) on held-out eval sets.

Training and evaluation see the same tokens: a sample is its conversation rendered through the
proxy's chat template and cut to `max_tokens`, and both the fine-tune's loss and the eval loss count
the response alone (the tokens after the prompt rendered up to the assistant's turn, as TRL's
prompt-completion format does). The eval loss is the mean negative log-likelihood per response
token over the whole set, teacher-forced."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Literal

from pydantic import Field, field_validator

from raysel.core.models import tokenize
from raysel.core.section import Section, repeated

log = logging.getLogger(__name__)

METRICS = ("loss", "exact_match")
# How a sample too long for evaluate.max_tokens is cut; part of every adapter's and score's key. A cut
# that kept the prompt's start skipped any sample whose prompt alone was over the window: a third of
# coverage's picks, and all but 20 tokens of the benchmark's code set, at 128 tokens.
CUT = "prompt end kept, at most half the window; then the response's end cut"


class EvalSet(Section):
    """A held-out eval set: its name in results and reports, and its files (any input format)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    paths: list[str] = Field(min_length=1)


class EvaluateConfig(Section):
    """`raysel evaluate`: each selection, and `random` at its budget, fine-tunes a proxy once per seed."""

    model: str | None = None
    """`raysel evaluate`'s proxy: any HF causal LM (a hub id or a directory, or the embedded default); `null`:
    `model.name`"""
    seeds: int = Field(3, ge=1)
    """fine-tunes per selection, seeds 0..n−1 (each its adapter's start, its data order, and its draw of the random
    control); intervals need 2 or more"""
    sets: list[EvalSet] = []
    """the held-out eval sets, each `{name, paths}` (any input format); required by `raysel evaluate`, and refused when
    one shares an id or a normalised instruction (first user turn, lowercased, whitespace collapsed) with the pool or
    with a method's targets or anchor"""
    metrics: list[Literal["loss", "exact_match"]] = ["loss"]
    """`loss`: the mean NLL per response token, teacher-forced; `exact_match`: greedy answers, the final number (after
    GSM8K's `####`, else the last) against the reference's, over the rows whose reference has one"""
    lora_rank: int = Field(16, gt=0)
    """LoRA rank (peft), on every linear module of the adapted layers"""
    lora_alpha: float = Field(32, gt=0)
    """LoRA alpha"""
    lora_layers: int | None = Field(8, gt=0)
    """adapters on the top n decoder layers only (`null`: all): the backward pass stops below them"""
    learning_rate: float = Field(1e-3, gt=0)
    """the top of LoRA's usual range: a 100-sample proxy takes 13 steps, and at 2e-4 the demo's adapters moved the
    held-out loss by under 0.01 nats"""
    epochs: float = Field(1, gt=0)
    """passes over the selection"""
    batch_size: int = Field(8, gt=0)
    """samples per step, and per eval forward pass"""
    max_tokens: int = Field(256, gt=0)
    """a sample (prompt and response) is cut to this many tokens, the response's end first; one whose response does not
    start within it is skipped and counted (`n_skipped`)"""
    max_new_tokens: int = Field(256, gt=0)
    """`exact_match`'s answer length"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """`auto`: bf16 autocast where the fine-tune's own task finds native bf16 (a GPU that supports it; a CPU with
    AVX512-BF16 or AMX), resolved in the task, not on the driver; the weights stay fp32 on a CPU and load in bf16 on
    such a GPU; `float32`; `bfloat16`"""
    num_cpus: float = Field(1, gt=0)
    """CPUs per fine-tune (its torch threads on a CPU)"""
    num_gpus: float = Field(0, ge=0)
    """GPUs per fine-tune; `1` on a GPU cluster, so methods × seeds run side by side (`> 0` also puts the proxy on
    `cuda`)"""

    @field_validator("sets")
    @classmethod
    def _names_once(cls, v):
        twice = repeated([s.name for s in v])
        if twice:
            raise ValueError(f"evaluate.sets: {', '.join(twice)} named twice; each set is one column of results")
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics_once(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError(f"evaluate.metrics: each of {', '.join(METRICS)} at most once, and at least one")
        return v

    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    def training(self) -> dict:
        """The settings a fine-tune's adapter depends on (its resume key)."""
        return self.model_dump(include={"lora_rank", "lora_alpha", "lora_layers", "learning_rate", "epochs",
                                        "batch_size", "max_tokens", "dtype"}) | {"cut": CUT}  # fmt: skip


def uses_bf16(dtype: str, device: str) -> bool:
    """Whether the fine-tune and its scoring run in bf16 autocast: asked for, or `auto` on hardware
    that does bf16 natively (most GPUs since Ampere; CPUs with AVX512-BF16 or AMX)."""
    import torch

    from raysel.core.models import cpu_has_bf16

    if dtype != "auto":
        return dtype == "bfloat16"
    return torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_bf16()


def example(tokenizer, template: str | None, messages: list[dict] | None, text: str | None, max_tokens: int):
    """One sample as the proxy trains on it: input_ids and the completion mask (1 on response tokens),
    cut to max_tokens (CUT). Plain text is all response. None when there is no response."""
    if messages is None:
        ids, start = tokenize(tokenizer, [text])["input_ids"][0], 0
    else:
        if not messages or messages[-1]["role"] != "assistant":
            return None
        render = dict(tokenize=True, return_dict=True, chat_template=template)
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, **render)["input_ids"]
        ids = tokenizer.apply_chat_template(messages, **render)["input_ids"]
        # the response starts where the two renderings part (a template may render the prompt alone differently)
        start = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
    if len(ids) > max_tokens:
        # the prompt's end (the question, the assistant header) is what the response follows on
        keep = min(start, max(max_tokens - (len(ids) - start), max_tokens // 2))
        ids, start = ids[start - keep :][:max_tokens], keep
    if start >= len(ids):
        return None
    return {"input_ids": list(ids), "completion_mask": [0] * start + [1] * (len(ids) - start)}


def pad_id(tokenizer) -> int:
    """The id a batch is padded with: the tokenizer's pad token, else its end of sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def padded(batch: list[dict], pad_id: int, device: str, left: bool = False):
    """input_ids, completion mask and attention mask as tensors, padded to the batch's longest."""
    import torch

    width = max(len(e["input_ids"]) for e in batch)
    out = {k: torch.zeros((len(batch), width), dtype=torch.long) for k in ("input_ids", "completion_mask", "attention")}
    out["input_ids"].fill_(pad_id)
    for i, e in enumerate(batch):
        n = len(e["input_ids"])
        at = slice(width - n, width) if left else slice(0, n)
        out["input_ids"][i, at] = torch.tensor(e["input_ids"])
        out["completion_mask"][i, at] = torch.tensor(e.get("completion_mask", [1] * n))
        out["attention"][i, at] = 1
    return {k: v.to(device) for k, v in out.items()}


def response_token_nll(model, input_ids, attention, completion_mask, bottom=None):
    """The negative log-likelihood of each response token of a padded batch, teacher-forced, flattened.

    The model's head runs only at the positions that predict a response token (`logits_to_keep` as a
    boolean mask): the vocabulary projection and its softmax at every position were a third of an
    eval pass and, through TRL's chunked loss on a CPU, 40 % of a fine-tune step. The model's own
    forward applies its head, so a model's logit scaling or soft-capping is kept.

    `bottom`: (n, the batch's residual stream after the model's first n decoder layers), from
    bottom_states; only the layers above n run."""
    import torch.nn.functional as F

    predicts = (completion_mask[:, 1:] * attention[:, 1:]).bool()  # position t predicts token t + 1
    keep = F.pad(predicts, (0, 1))  # the last position predicts nothing
    if bottom is None:
        logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep, use_cache=False).logits
    else:
        n, hidden = bottom
        with only_layers(model, slice(n, None)):
            logits = model(inputs_embeds=hidden, attention_mask=attention, logits_to_keep=keep, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:][predicts], reduction="none")


@contextlib.contextmanager
def only_layers(model, part: slice, norm: bool = True):
    """The model with only its decoder layers `part` (and without its final norm unless `norm`), restored
    after: the bottom layers' output of one pass is the top layers' input of another."""
    import torch

    decoder = model.get_decoder()
    layers, final = decoder.layers, decoder.norm
    decoder.layers = layers[part]
    decoder.norm = final if norm else torch.nn.Identity()
    try:
        yield decoder
    finally:
        decoder.layers, decoder.norm = layers, final


def eval_batches(examples: list[dict], batch_size: int, pad_id: int, device) -> Iterator[dict]:
    """The padded batches an eval pass runs, in a fixed order: like lengths together, so they pad little."""
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]))
    for i in range(0, len(ordered), batch_size):
        yield padded(ordered[i : i + batch_size], pad_id, device)


def response_nll(
    model, examples: list[dict], batch_size: int, pad_id: int, bf16: bool = False, bottom: tuple | None = None
) -> tuple[float, int]:
    """The summed negative log-likelihood of the response tokens, teacher-forced, and their count.
    `bottom`: bottom_states of the same examples, batch size and pad: the layers below n are not run."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i, b in enumerate(eval_batches(examples, batch_size, pad_id, device)):
            at = bottom and (bottom[0], bottom[1][i].to(device))
            nll = response_token_nll(model, b["input_ids"], b["attention"], b["completion_mask"], at)
            total += float(nll.sum())
            count += nll.numel()
    return total, count


def bottom_states(model, examples: list[dict], batch_size: int, pad_id: int, n: int, bf16: bool = False):
    """(n, each eval batch's residual stream after the model's first n decoder layers): with adapters on
    the layers above n only, this part of an eval pass is the same for every adapter, so it is run once.
    None where resuming from it does not give the whole model's loss on the first batch (a model that
    scales its input embeddings, say); the pass then runs whole."""
    import torch

    device = next(model.parameters()).device
    states = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for b in eval_batches(examples, batch_size, pad_id, device):
            with only_layers(model, slice(0, n), norm=False) as decoder:
                states.append(decoder(input_ids=b["input_ids"], attention_mask=b["attention"], use_cache=False)
                              .last_hidden_state.cpu())  # fmt: skip
            if len(states) == 1:
                whole = response_token_nll(model, b["input_ids"], b["attention"], b["completion_mask"])
                resumed = response_token_nll(model, b["input_ids"], b["attention"], b["completion_mask"],
                                             (n, states[0].to(device)))  # fmt: skip
                if not torch.allclose(whole, resumed, rtol=1e-4, atol=1e-4):
                    log.warning("evaluate: the proxy's top layers do not resume from its bottom layers' output "
                                "(max difference %.2g); each adapter's eval pass runs the whole model",
                                float((whole - resumed).abs().max()))  # fmt: skip
                    return None
    return n, states


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer of a worked solution: the number after GSM8K's last `####`, else the last number."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    value = (numbers[0] if "####" in text else numbers[-1]).replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def exact_match(model, tokenizer, template, rows: list[dict], max_new_tokens: int, batch_size: int) -> tuple[int, int]:
    """Greedy answers to the rows' prompts whose reference has a final answer: (right, asked)."""
    import torch

    device = next(model.parameters()).device
    asked = [
        (tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                       return_dict=True, chat_template=template)["input_ids"], answer)
        for r in rows
        if r["messages"] and r["messages"][-1]["role"] == "assistant"
        and (answer := extract_answer(r["messages"][-1]["content"])) is not None
    ]  # fmt: skip
    pad = pad_id(tokenizer)
    right = 0
    for i in range(0, len(asked), batch_size):
        part = asked[i : i + batch_size]
        b = padded([{"input_ids": ids} for ids, _ in part], pad, device, left=True)
        with torch.no_grad():
            out = model.generate(input_ids=b["input_ids"], attention_mask=b["attention"], do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)  # fmt: skip
        for (_, answer), new in zip(part, out[:, b["input_ids"].shape[1] :]):
            right += extract_answer(tokenizer.decode(new, skip_special_tokens=True)) == answer
    return right, len(asked)


def linear_names(model) -> list[str]:
    """The names of the decoder layers' linear modules (q_proj, ..., down_proj): LoRA's targets."""
    import torch

    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    )


def finetune(model, tokenizer, examples: list[dict], cfg: EvaluateConfig, seed: int, out_dir: str) -> dict:
    """Train a LoRA adapter on `examples` with TRL's SFTTrainer (loss on the completion mask), save it
    to out_dir (peft's format), and return the adapted model and what the training logged."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig

    from raysel.core.sft_trainer import ResponseLossTrainer

    set_seed(seed)  # the adapter's initial weights are drawn before the trainer seeds anything
    n_layers = model.config.num_hidden_layers
    top = cfg.lora_layers and min(cfg.lora_layers, n_layers)
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=linear_names(model),
        layers_to_transform=list(range(n_layers - top, n_layers)) if top else None,
        task_type="CAUSAL_LM",
    )
    device = cfg.device()
    args = SFTConfig(
        output_dir=out_dir,
        per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        seed=seed,
        data_seed=seed,
        bf16=uses_bf16(cfg.dtype, device),
        use_cpu=device == "cpu",
        gradient_checkpointing=False,  # a 100-sample proxy fits; checkpointing would redo every forward
        completion_only_loss=True,
        max_length=None,  # cut already, by example()
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = ResponseLossTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer, peft_config=lora
    )
    result = trainer.train()
    trainer.model.save_pretrained(out_dir)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "model": trainer.model,
        "train_loss": round(float(result.training_loss), 5),
        "first_loss": round(float(losses[0]), 5) if losses else None,
        "last_loss": round(float(losses[-1]), 5) if losses else None,
        "steps": int(result.global_step),
        "n_train": len(examples),
        "n_train_tokens": sum(sum(e["completion_mask"]) for e in examples),
        "bf16": bool(args.bf16),
    }
