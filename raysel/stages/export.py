"""`raysel export`: a selection in the file format a trainer reads as it is.

    trl       {"messages": [{role, content}, ...]}: TRL's conversational format (SFTTrainer)
    alpaca    {"instruction", "input", "output", "system", "history"}: axolotl's and LLaMA-Factory's alpaca
    sharegpt  {"conversations": [{from, value}, ...], "system"}: axolotl's and LLaMA-Factory's sharegpt

Each writes `train.jsonl` under the output folder; alpaca and sharegpt also write LLaMA-Factory's
`dataset_info.json` entry for it. A selected row without chat turns (plain text input) has no place
in these formats: it is left out and counted in `export.json`, never dropped silently.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq

from raysel.core import paths
from raysel.core.section import ConfigError
from raysel.core.storage import Storage
from raysel.stages.publish import check_finished

log = logging.getLogger(__name__)

FORMATS = ("trl", "alpaca", "sharegpt")
SPEAKERS = {"system": "system", "user": "human", "assistant": "gpt"}


def export(storage: Storage, method: str, fmt: str, out: Path) -> dict:
    """selection/<method>/'s rows in `fmt`, under `out`; what was written and what was left out."""
    if fmt not in FORMATS:
        raise ConfigError(f"export --format: {fmt!r} is not one of {', '.join(FORMATS)}")
    check_finished(storage, method, "export")
    folder = f"{paths.selection(method)}/data"
    table = pq.read_table(storage.path(folder), columns=["id", "messages"], filesystem=storage.fs)
    out.mkdir(parents=True, exist_ok=True)
    written, left_out = 0, []
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for row in table.to_pylist():
            converted = convert(row["messages"], fmt) if row["messages"] else None
            if converted is None:
                left_out.append(row["id"])
                continue
            f.write(json.dumps(converted, ensure_ascii=False) + "\n")
            written += 1
    if fmt != "trl":
        (out / "dataset_info.json").write_text(json.dumps({f"raysel_{method}": dataset_info(fmt)}, indent=2))
    summary = {"method": method, "format": fmt, "rows": written, "left_out": len(left_out),
               "left_out_ids": left_out[:100], "source": storage.uri(paths.selection(method))}  # fmt: skip
    (out / "export.json").write_text(json.dumps(summary, indent=2))
    if left_out:
        log.warning("export: %d selected row(s) have no chat turns (plain text) and are left out", len(left_out))
    return summary


def convert(messages: list[dict], fmt: str) -> dict | None:
    """One sample's turns in `fmt`; None where they do not alternate user, assistant (what alpaca and
    sharegpt trainers require) after the system prompt."""
    if fmt == "trl":
        return {"messages": messages}
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or len(turns) % 2 or any(t["role"] != ("user", "assistant")[i % 2] for i, t in enumerate(turns)):
        return None
    if fmt == "sharegpt":
        return {"conversations": [{"from": SPEAKERS.get(m["role"], m["role"]), "value": m["content"]} for m in turns],
                "system": system}  # fmt: skip
    pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns) - 2, 2)]
    return {"instruction": turns[-2]["content"], "input": "", "output": turns[-1]["content"], "system": system,
            "history": [list(p) for p in pairs]}  # fmt: skip


def dataset_info(fmt: str) -> dict:
    """LLaMA-Factory's dataset_info.json entry for train.jsonl in `fmt`."""
    if fmt == "alpaca":
        columns = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                   "history": "history"}  # fmt: skip
        return {"file_name": "train.jsonl", "formatting": "alpaca", "columns": columns}
    return {
        "file_name": "train.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
    }
