"""One input record to one sample: shape detection, field mapping, validation,
the stable id, and rendering through the chat template.

Every sample, whatever its input shape, comes out as `messages` (a list of
role/content turns; null for plain text) plus the rendered `text`."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
from pydantic import Field

from raysel.core.section import Section


class FieldMap(Section):
    """Which column of an input record holds each part of a sample."""

    id: str | None = None
    """column with a stable id; `null`: the id is a hash of the normalised content"""
    instruction: str = "instruction"
    """alpaca: the instruction column"""
    input: str = "input"
    """alpaca: the optional input column, appended to the instruction after a blank line"""
    output: str = "output"
    """alpaca: the response column"""
    system: str = "system"
    """alpaca: an optional system prompt column"""
    messages: str = "messages"
    """chat: the list of turns"""
    role: str = "role"
    """chat: a turn's role key"""
    content: str = "content"
    """chat: a turn's text key"""
    conversations: str = "conversations"
    """ShareGPT: the list of turns"""
    speaker: str = "from"
    """ShareGPT: a turn's speaker key"""
    value: str = "value"
    """ShareGPT: a turn's text key"""
    role_map: dict[str, str] = {}
    """a turn's role (chat) or speaker (ShareGPT) mapped to `system`, `user` or `assistant`, over the built-in map
    (`human`→user, `gpt`, `bot`, `model`, `chatgpt`→assistant); a role in neither passes as it is"""
    text: str = "text"
    """plain text, taken as already rendered"""


# The roles ShareGPT and its kin write, as the chat templates know them; input.fields.role_map adds to
# them or overrides them. A role in neither passes as it is (the template may refuse it: template_error).
ROLES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
         "user": "user", "assistant": "assistant", "system": "system"}  # fmt: skip
# A sample's turns as the prepared store and every selection hold them
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


class PrepareConfig(Section):
    chat_template: Literal["auto", "fallback"] = "auto"
    """`auto`: the tokenizer's chat template (the fallback if it has none); `fallback`"""
    max_tokens: int = Field(512, gt=0)
    """longer samples are cut to this many tokens and flagged `truncated`, never dropped"""
    dedup: bool = True
    """reject rows whose normalised content repeats an earlier row's"""
    batch_size: int = Field(512, gt=0)
    """rows per formatting task (Ray tasks, as many at once as there are free CPUs)"""
    rows_per_file: int = Field(1024, gt=0)
    """rows per prepared file; each file is one encode shard (the unit of resume)"""
    max_row_bytes: int = Field(16 << 20, ge=1024)
    """a row (line, array element or table row as JSON) over this many bytes is rejected as `too_large`; only its first
    4 KiB is ever held"""


# Used when the tokenizer has no chat template, or when prepare.chat_template is
# "fallback". Each turn becomes "### Role:\n<content>\n\n".
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "### {{ message['role'] | capitalize }}:\n{{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

# Reason codes a row can be rejected with, at each step of the way.
REASONS = (
    "too_large",  # the row is over prepare.max_row_bytes
    "invalid_utf8",  # the line is not valid UTF-8
    "malformed_json",  # the line (or the rest of a JSON array) does not parse as JSON
    "too_deep",  # nested deeper than the JSON parser's recursion allows (about 1,000 levels)
    "invalid_unicode",  # a string holds a lone UTF-16 surrogate (an escaped \\ud800), which UTF-8 cannot carry
    "number_out_of_range",  # an integer over 4,300 digits, or a float literal beyond double range (1e999)
    "non_finite_number",  # NaN or Infinity: not JSON
    "not_a_record",  # valid JSON, but not an object
    "missing_field",  # a required field of the shape is absent or null
    "wrong_type",  # a field holds the wrong type
    "empty_text",  # nothing but whitespace once formatted
    "template_error",  # the chat template refused the conversation (e.g. roles out of order)
    "duplicate_id",  # an earlier row has the same id
    "duplicate_text",  # an earlier row has the same content (prepare.dedup)
    "internal_error",  # anything unforeseen while preparing the row: the exception's type and message
    "encode_error",  # the tokenizer or the model failed on this sample alone, in the encode stage
)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Sample:
    shape: str  # alpaca | messages | text
    messages: list[dict] | None  # [{"role", "content"}]; None for plain text
    text: str | None  # the input text of a plain-text record
    id: str
    content_hash: str


def parse_record(raw: str) -> dict:
    """One row's JSON text to a record, or Rejected with the reason it cannot be one."""
    try:
        record = json.loads(raw, parse_float=_finite_float, parse_constant=_non_finite)
    except json.JSONDecodeError as err:
        raise Rejected("malformed_json", str(err)) from None
    except RecursionError:
        raise Rejected("too_deep", "nested deeper than the JSON parser allows") from None
    except ValueError as err:  # int() past sys.get_int_max_str_digits()
        raise Rejected("number_out_of_range", str(err)) from None
    if not isinstance(record, dict):
        raise Rejected("not_a_record", f"expected a JSON object, got {type(record).__name__}")
    if _SURROGATE_ESCAPE.search(raw):  # only an escape can make a lone surrogate; decoded UTF-8 never does
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            raise Rejected("invalid_unicode", f"a lone surrogate {err.object[err.start]!r}") from None
    return record


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Rejected("number_out_of_range", f"{text[:40]} is beyond the range of a double")
    return value


def _non_finite(name: str):
    raise Rejected("non_finite_number", f"{name} is not a JSON number")


def normalize(record: dict, fields: FieldMap, shape: str = "auto") -> Sample:
    """Map a record of any supported shape to a Sample, or raise Rejected."""
    shape = _detect_shape(record, fields) if shape == "auto" else shape
    if shape == "messages":
        messages, text = _chat_messages(record, fields, fields.messages, fields.role, fields.content), None
    elif shape == "sharegpt":
        messages, text = _chat_messages(record, fields, fields.conversations, fields.speaker, fields.value), None
    elif shape == "alpaca":
        messages, text = _alpaca_messages(record, fields), None
    else:
        messages, text = None, _string(record, fields.text, required=True)
    contents = [m["content"] for m in messages] if messages is not None else [text]
    if not any(c.strip() for c in contents):
        raise Rejected("empty_text", "every text field is empty or whitespace")
    content_hash = _hash({"messages": messages} if messages is not None else {"text": text})
    return Sample(shape, messages, text, _sample_id(record, fields, content_hash), content_hash)


def chat_template_for(tokenizer, choice: str) -> str | None:
    """The template to pass to apply_chat_template: None means the tokenizer's own."""
    return None if choice == "auto" and tokenizer.chat_template else FALLBACK_CHAT_TEMPLATE


def shared_prefix(tokenizer, chat_template: str | None) -> str:
    """What the template puts before every conversation's first user text (a
    default system prompt, role headers): the common start of two renderings."""
    a, b = (
        tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, chat_template=chat_template)
        for c in ("A", "B")
    )
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[:n]


def system_scaffold(tokenizer, chat_template: str | None) -> tuple[str, str] | None:
    """What the template puts around a conversation's own system prompt, up to its first user text:
    the text before the prompt (its header) and the text between it and the user's text. None when
    the template renders no system turn, or gives it no header to be recognised by."""
    system, user = "Qq-system-prompt-qQ", "Qq-user-text-qQ"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user}],
            tokenize=False,
            chat_template=chat_template,
        )
    except Exception:  # a template that refuses system turns (jinja's raise_exception)
        return None
    if system not in text or user not in text.split(system, 1)[1]:
        return None
    before, rest = text.split(system, 1)
    return (before, rest.split(user, 1)[0]) if before.strip() else None


def render(sample: Sample, tokenizer, chat_template: str | None) -> str:
    """The text the model sees. Plain-text records are taken as already rendered."""
    if sample.messages is None:
        return sample.text
    try:
        return tokenizer.apply_chat_template(sample.messages, tokenize=False, chat_template=chat_template)
    except Exception as err:  # templates raise their own errors (jinja's raise_exception), per row
        raise Rejected("template_error", f"{type(err).__name__}: {err}") from None


def _detect_shape(record: dict, fields: FieldMap) -> str:
    shapes = [("messages", fields.messages), ("sharegpt", fields.conversations), ("alpaca", fields.instruction),
              ("text", fields.text)]  # fmt: skip
    for shape, key in shapes:
        if record.get(key) is not None:
            return shape
    raise Rejected(
        "missing_field",
        f"no field of a known shape: expected {fields.messages!r} (chat), {fields.conversations!r} (ShareGPT), "
        f"{fields.instruction!r} (alpaca) or {fields.text!r} (plain text)",
    )


def _alpaca_messages(record: dict, fields: FieldMap) -> list[dict]:
    instruction = _string(record, fields.instruction, required=True)
    extra = _string(record, fields.input, required=False)
    output = _string(record, fields.output, required=True)
    system = _string(record, fields.system, required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return ([{"role": "system", "content": system}] if system.strip() else []) + turns


def _chat_messages(record: dict, fields: FieldMap, key: str, role_key: str, content_key: str) -> list[dict]:
    """Chat turns (messages of {role, content}, or ShareGPT's conversations of {from, value}), their
    roles mapped to the ones chat templates know."""
    turns = record.get(key)
    if turns is None:
        raise Rejected("missing_field", f"field {key!r} is missing")
    if not isinstance(turns, list):
        raise Rejected("wrong_type", f"field {key!r} must be a list, got {type(turns).__name__}")
    roles = ROLES | fields.role_map
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise Rejected("wrong_type", f"{key}[{i}] must be an object, got {type(turn).__name__}")
        role = _string(turn, role_key, required=True, where=f"{key}[{i}].")
        content = _string(turn, content_key, required=True, where=f"{key}[{i}].")
        messages.append({"role": roles.get(role, role), "content": content})
    return messages


def _string(record: dict, key: str, required: bool, where: str = "") -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise Rejected("missing_field", f"field {where}{key!r} is missing")
        return ""
    if not isinstance(value, str):
        raise Rejected("wrong_type", f"field {where}{key!r} must be a string, got {type(value).__name__}")
    return value


def _sample_id(record: dict, fields: FieldMap, content_hash: str) -> str:
    if fields.id is None:
        return content_hash
    value = record.get(fields.id)
    if value is None or value == "":
        raise Rejected("missing_field", f"id field {fields.id!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Rejected("wrong_type", f"id field {fields.id!r} must be a string or integer, got {type(value).__name__}")
    return str(value)


def _hash(obj) -> str:
    canonical = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]
