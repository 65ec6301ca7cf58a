import pytest
from transformers import AutoTokenizer

from raysel.config import FieldMap
from raysel.core.records import FALLBACK_CHAT_TEMPLATE, Rejected, normalize, render

ALPACA = {"instruction": "Add 2 and 3.", "input": "Show your work.", "output": "2 + 3 = 5"}
CHAT = {
    "messages": [
        {"role": "user", "content": "Add 2 and 3.\n\nShow your work."},
        {"role": "assistant", "content": "2 + 3 = 5"},
    ]
}


def test_alpaca_and_chat_records_normalize_to_the_same_sample():
    a, c = normalize(ALPACA, FieldMap()), normalize(CHAT, FieldMap())
    assert (a.shape, c.shape) == ("alpaca", "messages")
    assert a.messages == c.messages
    assert a.content_hash == c.content_hash == a.id  # no id column: the id is the content hash


def test_plain_text_record():
    s = normalize({"text": "Just some text."}, FieldMap())
    assert (s.shape, s.messages, s.text) == ("text", None, "Just some text.")
    assert render(s, tokenizer=None, chat_template=None) == "Just some text."


def test_field_mapping_and_id_column():
    fields = FieldMap(id="uid", instruction="q", output="a", input="ctx", system="sys")
    s = normalize({"uid": 17, "q": "Why?", "a": "Because.", "sys": "Be brief."}, fields)
    assert s.id == "17"
    assert s.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because."},
    ]


def test_empty_input_field_is_left_out_of_the_prompt():
    s = normalize({"instruction": "Hi", "input": "  ", "output": "Hello"}, FieldMap())
    assert s.messages[0] == {"role": "user", "content": "Hi"}


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"output": "x"}, "missing_field"),  # no field of any shape
        ({"instruction": "x"}, "missing_field"),  # alpaca without output
        ({"instruction": ["x"], "output": "y"}, "wrong_type"),
        ({"instruction": "x", "output": 5}, "wrong_type"),
        ({"messages": "hello"}, "wrong_type"),
        ({"messages": [{"role": "user"}]}, "missing_field"),
        ({"messages": [{"role": "user", "content": 3}]}, "wrong_type"),
        ({"messages": ["hi"]}, "wrong_type"),
        ({"messages": []}, "empty_text"),
        ({"instruction": " ", "output": "\n"}, "empty_text"),
        ({"text": "   "}, "empty_text"),
    ],
)
def test_bad_records_are_rejected_with_a_reason(record, reason):
    with pytest.raises(Rejected) as rej:
        normalize(record, FieldMap())
    assert rej.value.reason == reason


def test_forced_shape_requires_its_fields():
    with pytest.raises(Rejected, match="'text' is missing"):
        normalize({"instruction": "x", "output": "y"}, FieldMap(), shape="text")


def test_id_column_must_hold_a_string_or_integer():
    with pytest.raises(Rejected) as rej:
        normalize({"id": {"a": 1}, "text": "t"}, FieldMap(id="id"))
    assert rej.value.reason == "wrong_type"
    with pytest.raises(Rejected) as rej:
        normalize({"text": "t"}, FieldMap(id="id"))
    assert rej.value.reason == "missing_field"


def test_render_uses_the_tokenizers_template_or_the_fallback(tiny_chat_tokenizer_dir, tiny_tokenizer_dir):
    sample = normalize(ALPACA, FieldMap())
    chat = AutoTokenizer.from_pretrained(tiny_chat_tokenizer_dir)
    assert render(sample, chat, None) == "<|user|>Add 2 and 3.\n\nShow your work.\n<|assistant|>2 + 3 = 5\n"
    plain = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert plain.chat_template is None
    assert render(sample, plain, FALLBACK_CHAT_TEMPLATE) == (
        "### User:\nAdd 2 and 3.\n\nShow your work.\n\n### Assistant:\n2 + 3 = 5\n\n"
    )


def test_a_template_that_refuses_the_conversation_rejects_the_row(tiny_chat_tokenizer_dir):
    sample = normalize({"messages": [{"role": "narrator", "content": "Once upon a time"}]}, FieldMap())
    with pytest.raises(Rejected) as rej:
        render(sample, AutoTokenizer.from_pretrained(tiny_chat_tokenizer_dir), None)
    assert rej.value.reason == "template_error" and "unknown role narrator" in rej.value.detail
