"""docs/config.md, written from the config models: every key's default and meaning (the field's
docstring), so that the reference cannot drift from the code. `raysel config --reference` prints it."""

from __future__ import annotations

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from raysel.config import RunConfig
from raysel.methods import METHODS, MethodConfig

HEADER = """# Config reference

Every key of a run config, its default and what it does. This page is written by
`raysel config --reference > docs/config.md` from the config models themselves (a test checks it is
current). A run config is YAML with any of these sections; `--set key=value` overrides a key from
the command line (`--set select.methods.coverage.budget=5` reaches into a list by a method's name),
and `RAYSEL_SECTION__KEY=value` from the environment. An unknown key is an error.

| key | default | meaning |
|---|---|---|
"""

METHODS_INTRO = """
## Selection methods

Each entry of `select.methods` is one method's config: its `name`, an optional `budget`, and the
settings below. A setting that used to live in a section of its own (`task.*`, `mona.*`, `igds.*`,
`select.idf`, `select.distributed*`, `select.partitions`, `fac.evaluated`) is refused with a message
naming its place in the entry.
"""


def reference() -> str:
    lines = [HEADER.rstrip("\n")]
    lines += [_row(key, field) for key, field in _fields(RunConfig)]
    lines.append(METHODS_INTRO)
    for name, method in METHODS.items():
        lines += _method(name, method.Config)
    return "\n".join(lines) + "\n"


def _fields(model: type[BaseModel], prefix: str = ""):
    """(dotted key, field) for every leaf of a section, nested sections flattened."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _fields(field.annotation, f"{prefix}{name}.")
        else:
            yield prefix + name, field


def _method(name: str, config: type[MethodConfig]) -> list[str]:
    rows = [_row(key, field) for key, field in _fields(config) if key != "name"]
    return [
        f"### `{name}`",
        "",
        _cell(config.__doc__),
        "",
        "| setting | default | meaning |",
        "|---|---|---|",
        *rows,
        "",
    ]


def _row(key: str, field) -> str:
    return f"| `{key}` | {_default(field)} | {_cell(field.description)} |"


def _default(field) -> str:
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, list):  # select.methods: the entries by name
        value = [e.get("name", e) if isinstance(e, dict) else e for e in value]
    shown = yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
    return f"`{shown}`"


def _cell(text: str | None) -> str:
    if not text:
        raise ValueError("a config field without a docstring: the reference needs its meaning")
    return " ".join(text.split()).replace("|", "\\|")
