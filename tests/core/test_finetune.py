"""The proxy fine-tune's parts on a tiny real Llama (built from config): the response mask, the
teacher-forced response loss against a hand computation, a LoRA fine-tune through TRL, the answer
extractor, and the intervals the evaluate stage reports."""

from __future__ import annotations

import numpy as np
import pytest

from raysel.core.finetune import EvaluateConfig, bottom_states, example, extract_answer, finetune, response_nll
from raysel.core.intervals import mean_interval, paired_difference

CONVERSATIONS = [
    [{"role": "user", "content": "Add two and three."}, {"role": "assistant", "content": "Two and three make five."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour of the sky at noon, please."},
        {"role": "assistant", "content": "Blue."},
    ],
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_the_completion_mask_covers_the_response_and_nothing_of_the_prompt(tiny):
    """Catches a prompt token trained on, or a response token left out of the loss."""
    _, tok = tiny
    for messages in CONVERSATIONS:
        e = example(tok, None, messages, None, 512)
        mask = np.array(e["completion_mask"], bool)
        ids = np.array(e["input_ids"])
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        assert tok.decode(ids[~mask]) == prompt
        assert tok.decode(ids[mask]) == f"<|assistant|>{messages[-1]['content']}\n"
    assert example(tok, None, CONVERSATIONS[0][:1], None, 512) is None  # no response at all


@pytest.mark.parametrize(
    ("answer", "response_tokens"), [("It is a long story, told briefly. " * 10, 32), ("Yes.", None)]
)
def test_a_long_prompt_keeps_its_end_and_the_response_its_start(tiny, answer, response_tokens):
    """Catches a cut that skips every sample whose prompt alone fills the window (at 128 tokens, a
    third of coverage's picks and nearly all of a code eval set), or that keeps the prompt's start
    (a system prompt) instead of the question the response follows on."""
    _, tok = tiny
    long = [{"role": "user", "content": "Explain this step. " * 60}, {"role": "assistant", "content": answer}]
    full = example(tok, None, long, None, 10_000)
    start = full["completion_mask"].index(1)
    response = len(full["input_ids"]) - start
    assert start > 64
    cut = example(tok, None, long, None, 64)
    k = cut["completion_mask"].index(1)
    assert len(cut["input_ids"]) == 64 and sum(cut["completion_mask"]) == (response_tokens or response)
    assert cut["input_ids"][:k] == full["input_ids"][start - k : start]  # the prompt's end
    assert cut["input_ids"][k:] == full["input_ids"][start : start + 64 - k]  # the response's start


def test_response_nll_is_the_hand_computed_nll_of_the_response_tokens(tiny):
    """Two samples of different lengths in one padded batch. Catches a prompt token counted, a response
    token left out, an off-by-one in the shift, and padding leaking into the sum."""
    import torch

    model, tok = tiny
    batch = [example(tok, None, m, None, 512) for m in CONVERSATIONS]
    assert len({len(e["input_ids"]) for e in batch}) == 2
    total, count = response_nll(model, batch, batch_size=2, pad_id=tok.pad_token_id)
    want, n = 0.0, 0
    with torch.no_grad():
        for e in batch:
            ids = torch.tensor([e["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for t, on in enumerate(e["completion_mask"]):
                if on and t > 0:
                    want -= float(logp[t - 1, e["input_ids"][t]])
                    n += 1
    assert count == n == sum(sum(e["completion_mask"]) for e in batch) - sum(e["completion_mask"][0] for e in batch)
    assert total == pytest.approx(want, rel=1e-4)


def test_a_fine_tune_trains_the_adapter_and_lowers_the_loss_on_its_own_data(tiny_model_dir, tmp_path):
    """Catches a fine-tune that trains nothing (a frozen adapter, a loss masked to zero tokens) or that
    saves the adapter before training."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = [example(tok, None, m, None, 512) for m in CONVERSATIONS * 4]
    cfg = EvaluateConfig(lora_layers=2, learning_rate=1e-2, epochs=8, batch_size=4, dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before, n = response_nll(model.eval(), data, 4, tok.pad_token_id)
    record = finetune(model, tok, data, cfg, seed=0, out_dir=str(tmp_path))
    after, _ = response_nll(record["model"].eval(), data, 4, tok.pad_token_id)
    assert record["steps"] == 16 and record["n_train_tokens"] == sum(sum(e["completion_mask"]) for e in data)
    assert after / n < 0.9 * before / n  # 0.86 measured; an adapter that trains nothing gives 1
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path).eval()
    assert response_nll(reloaded, data, 4, tok.pad_token_id)[0] == pytest.approx(after, rel=1e-5)
    # adapters on the top 2 of 4 layers only
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in reloaded.named_parameters() if "lora_" in n}
    assert layers == {2, 3}
    # The layers below the adapters run once for every adapter's score: resumed from the base model's
    # bottom 2 layers, the adapted model's loss is its whole pass's. Catches a split one layer off, the
    # final norm left on the bottom's output, and bottom batches in another order than the pass's.
    bottom = bottom_states(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), data, 4, tok.pad_token_id, 2)
    assert bottom is not None and bottom[0] == 2 and len(bottom[1]) == 2
    assert response_nll(reloaded, data, 4, tok.pad_token_id, bottom=bottom)[0] == pytest.approx(after, rel=1e-5)


def test_a_proxy_that_does_not_resume_from_its_bottom_layers_runs_whole(tiny):
    """Granite scales its input embeddings inside its forward (embedding_multiplier, 12 in Granite 3), so its
    top layers fed the bottom's output would see it scaled again. Catches every adapter of such a proxy
    scored on a wrong pass."""
    import torch
    from transformers import GraniteConfig, GraniteForCausalLM

    _, tok = tiny
    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=1, embedding_multiplier=12.0)  # fmt: skip
    data = [example(tok, None, m, None, 512) for m in CONVERSATIONS]
    assert bottom_states(GraniteForCausalLM(config).eval(), data, 2, tok.pad_token_id, 2) is None


def test_the_trainers_loss_is_trls_own_on_the_same_batch(tiny_model_dir, tmp_path):
    """The fine-tune's loss runs the head at response positions only, in place of TRL's. Catches a
    shift off by one, a prompt or padding token counted, or a normalisation other than TRL's."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from raysel.core.sft_trainer import ResponseLossTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = [example(tok, None, m, None, 512) for m in CONVERSATIONS]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, completion_only_loss=True, max_length=None,
                     use_cpu=True, report_to="none")  # fmt: skip
    trainer = ResponseLossTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["attention_mask"] == 0).any() and (batch["labels"][batch["attention_mask"] == 1] == -100).any()
    ours = trainer.compute_loss(model, dict(batch))
    trls = SFTTrainer.compute_loss(trainer, model, dict(batch))
    assert float(ours) == pytest.approx(float(trls), rel=1e-5)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("She pays 3 * 4 = <<3*4=12>>12 dollars.\n#### 1,234", "1234"),
        ("#### -7.0", "-7"),
        ("So 2 and then 3, the answer is 42.", "42"),
        ("no number here", None),
    ],
)
def test_the_answer_extractor(text, answer):
    assert extract_answer(text) == answer


def test_a_planted_difference_is_found_and_no_difference_contains_zero():
    """Each seed's luck is shared by the method and the control (the same seed): only pairing cancels it.
    Catches intervals taken unpaired, or on seeds that do not match."""
    rng = np.random.default_rng(0)
    luck = rng.normal(0, 1.0, 8)  # large next to the planted 0.1
    control = {s: 2.0 + luck[s] + rng.normal(0, 0.02) for s in range(8)}
    better = {s: 2.0 - 0.1 + luck[s] + rng.normal(0, 0.02) for s in range(8)}
    same = {s: 2.0 + luck[s] + rng.normal(0, 0.02) for s in range(8)}
    found = paired_difference(better, control)
    assert found["ci"][1] < 0 and found["mean"] == pytest.approx(-0.1, abs=0.03)
    unpaired = mean_interval(better.values())["ci"], mean_interval(control.values())["ci"]
    assert unpaired[0][1] > unpaired[1][0]  # unpaired, the two intervals overlap: the difference is hidden
    null = paired_difference(same, control)
    assert null["ci"][0] < 0 < null["ci"][1]
    # only matching seeds pair: a seed the control lacks is left out
    partial = paired_difference({**better, 99: 0.0}, control)
    assert partial["seeds"] == list(range(8)) and partial["mean"] == pytest.approx(found["mean"])
    assert mean_interval([1.5])["ci"] is None
