"""The base of every typed config section, and the error a config problem raises. It stands apart
from raysel.config so that a method's module can define its own section and config.py can
gather them from the registry."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config problem, worded for the person who wrote the config."""


class Section(BaseModel):
    """Strict and frozen: an unknown key is an error, and a component cannot change what it was given.
    A field's docstring is its description, the meaning docs/config.md shows (generated from these)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def repeated(names: list[str]) -> list[str]:
    """The names that appear more than once, sorted: for the validators of lists keyed by name."""
    return sorted({n for n in names if names.count(n) > 1})
