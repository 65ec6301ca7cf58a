"""Exactly one BOS per sample with a tokenizer that adds one and a chat template that writes one, as
Llama-3's and Gemma's do: prepare, the encoder and IGDS's prefix all tokenize the rendered text
without adding it a second time, and plain text still gets its one."""

import pytest
import torch
from tokenizers import processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from raysel.config import InputConfig, ModelConfig, PrepareConfig, RunConfig
from raysel.core.encoder import Encoder
from raysel.core.models import tokenize
from raysel.stages.prepare import Formatter
from tests.conftest import build_tiny_sae

TEMPLATE = "<bos>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def bos_model(tiny_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bos-model")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.add_special_tokens({"bos_token": "<bos>"})
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_the_tokenizer_adds_a_bos_and_tokenize_never_adds_a_second(bos_model):
    tok = AutoTokenizer.from_pretrained(bos_model)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Name a prime."}], tokenize=False)
    assert rendered.startswith("<bos>") and tok(rendered)["input_ids"][:2] == [tok.bos_token_id] * 2  # the trap
    ids = tokenize(tok, [rendered, "plain text"])["input_ids"]
    assert [s.count(tok.bos_token_id) for s in ids] == [1, 1] and all(s[0] == tok.bos_token_id for s in ids)


def test_prepare_and_the_encoder_see_one_bos(bos_model, tmp_path):
    formatter = Formatter(InputConfig(paths=["-"]), PrepareConfig(max_tokens=64), ModelConfig(name=str(bos_model)))
    rows = [{"source": "f", "row": 1, "order": 1, "record": "{}", "shape": "alpaca", "reason": None,
             "messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]}]  # fmt: skip
    tok = formatter.tokenizer
    rows[0]["text"] = tok.apply_chat_template(rows[0]["messages"], tokenize=False)
    one_bos = tok(rows[0]["text"], add_special_tokens=False)["input_ids"]  # the template's own BOS only
    [row] = formatter._tokenized(rows)
    assert row["n_tokens"] == len(one_bos)

    stack = RunConfig.model_validate({"input": {"paths": ["-"]}, "model": {"name": str(bos_model), "dtype": "float32"},
                                      "sae": {"path": str(build_tiny_sae(tmp_path / "sae"))},
                                      "encode": {"skip_prefix": False}}).stack()  # fmt: skip
    features = Encoder(stack)(["a", "b"], [row["text"], "plain text"]).to_pylist()
    # every position but the first (the BOS, an attention sink) is pooled
    plain = tok("plain text")["input_ids"]
    assert [f["n_tokens"] for f in features] == [len(one_bos) - 1, len(plain) - 1]
