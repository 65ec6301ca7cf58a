"""The run's typed config, the composition root: the sections of the run (the infrastructure ones
defined beside the core code that reads them) and the method entries. One pydantic model per section, loaded from YAML with
`--set section.key=value` overrides. Every problem is reported before any work
starts, as `key.path: what is wrong (what is allowed)`."""

from __future__ import annotations

import copy
import os
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from raysel.core.corpus import InputConfig
from raysel.core.encoder import EncodeConfig, ModelStack
from raysel.core.fac import FACConfig
from raysel.core.finetune import EvalSet, EvaluateConfig
from raysel.core.models import ModelConfig
from raysel.core.ray_adapter import RayConfig
from raysel.core.records import FieldMap, PrepareConfig
from raysel.core.sae import SAESection, TrainSAEConfig
from raysel.core.section import ConfigError, Section, repeated
from raysel.core.storage import S3Config
from raysel.core.synthesis import SynthesisConfig
from raysel.methods import LEGACY_KEYS, METHODS, MethodEntry
from raysel.methods.fac import FACSelectConfig

SECRET_KEYS = {"access_key", "secret_key"}
RENAMED = {"synth": "synthesis"}  # sections renamed, and their new names
# The sections the run config composes; the infrastructure ones live beside the code that reads them.
__all__ = [
    "ActivationConfig", "ConfigError", "EncodeConfig", "EvalSet", "EvaluateConfig", "FACConfig", "FieldMap", "InputConfig", "ModelConfig",
    "ModelStack", "PrepareConfig", "RayConfig", "RunConfig", "S3Config", "SAESection", "SelectConfig",
    "StatsConfig", "SynthesisConfig", "TrainSAEConfig", "load_config",
]  # fmt: skip


class ActivationConfig(Section):
    """When a feature counts as activated in a sample, for statistics and selection alike."""

    tau: float = Field(0.0, ge=0)  # activated when the sample's max-pool exceeds tau
    target_active: float | None = Field(None, gt=0)  # set tau instead: samples average this many activated features
    # target_active's tau is calibrated on about this many samples (whole shards, evenly spaced through
    # the store; every shard when it holds fewer); null: every sample, exact at any size
    calibrate_rows: int | None = Field(100_000, gt=0)


class StatsConfig(Section):
    top_n: int = Field(10, gt=0)  # top-activating samples kept per feature


class SelectConfig(Section):
    """Which selection methods run, and what they share. An entry is a method's name, or a mapping
    with its name and its own settings: [coverage, {name: mona, targets: [t.jsonl]}] (see raysel.methods)."""

    methods: list[MethodEntry] = Field(["coverage", "random", "longest"], validate_default=True)
    budget: float = Field(0.1, gt=0)  # a count (>= 1) or a fraction of the encoded pool (< 1); an entry's budget wins
    seed: int = 0  # for `random`, RandGreeDi's partitioning and the baselines
    memory_check: bool = True  # refuse, naming the remedy, a pool the driver's free memory cannot hold

    @field_validator("methods", mode="before")
    @classmethod
    def _names_are_entries(cls, v):
        return [{"name": e} if isinstance(e, str) else e for e in v] if isinstance(v, list) else v

    @field_validator("methods")
    @classmethod
    def _each_once(cls, v):
        twice = repeated([e.name for e in v])
        if twice:
            raise ValueError(
                f"select.methods: {', '.join(twice)} listed twice; each method writes selection/<name>/ once"
            )
        return v


class OutputConfig(Section):
    root: str = "runs/default"  # a local folder or s3://bucket/prefix
    report: bool = True  # `raysel run` and `raysel demo` write report.html at the root


class RunConfig(Section):
    input: InputConfig = InputConfig()
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig = ModelConfig()
    sae: SAESection = SAESection()
    train_sae: TrainSAEConfig = TrainSAEConfig()
    encode: EncodeConfig = EncodeConfig()
    activation: ActivationConfig = ActivationConfig()
    stats: StatsConfig = StatsConfig()
    select: SelectConfig = SelectConfig()
    fac: FACConfig = FACConfig()
    synthesis: SynthesisConfig = SynthesisConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    s3: S3Config = S3Config()
    output: OutputConfig = OutputConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="before")
    @classmethod
    def _no_legacy_keys(cls, raw):
        """Settings that moved into a method's entry, or sections renamed, name their new place."""
        if isinstance(raw, dict):
            for old, new in RENAMED.items():
                if old in raw:
                    raise ValueError(f"{old}: renamed {new} (the stage, its folder and its section share one name)")
            for (section, key), moved in LEGACY_KEYS.items():
                value = raw.get(section)
                present = section in raw if key is None else isinstance(value, dict) and key in value
                if present:
                    raise ValueError(f"{section}{'.' + key if key else ''}: {moved}")
        return raw

    @model_validator(mode="after")
    def _one_input_source(self):
        if bool(self.input.paths) == bool(self.input.hf_dataset):
            raise ValueError("input: set exactly one of input.paths or input.hf_dataset")
        fac_select = [e for e in self.select.methods if isinstance(e, FACSelectConfig)]
        if fac_select and not self.fac.anchor:
            raise ValueError(f"fac.anchor: select.methods has {fac_select[0].name}, which needs anchor examples")
        return self

    def public_dict(self) -> dict:
        """The resolved config for manifests and logs; secrets come out masked."""
        return self.model_dump(mode="json")

    def stack(self) -> ModelStack:
        return ModelStack(
            model=self.model,
            sae=self.sae,
            train_sae=self.train_sae,
            encode=self.encode,
            prepare=self.prepare,
            s3=self.s3,
            shape=self.input.shape,
        )


def load_config(path: str | Path | None, overrides: list[str] = (), raw: dict | None = None) -> RunConfig:
    """The config of a YAML file (or of `raw`, a dict), with `--set` style overrides, validated."""
    raw = copy.deepcopy(raw) if raw is not None else _read_yaml(path) if path else {}
    for item in [*env_overrides(), *overrides]:
        _apply_override(raw, item)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def env_overrides() -> list[str]:
    """RAYSEL_SECTION__KEY=value as --set section.key=value (the pydantic-settings convention), for a
    cluster job whose command line is fixed: RAYSEL_ENCODE__ACTORS=8. A --set given too wins."""
    return [f"{name.removeprefix('RAYSEL_').lower().replace('__', '.')}={value}"
            for name, value in sorted(os.environ.items()) if name.startswith("RAYSEL_") and "__" in name]  # fmt: skip


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def _apply_override(raw: dict, item: str) -> None:
    """One `key.path=value`. A part of the path reaches into a list by index (input.paths.0) or, in a
    list of named entries, by name (select.methods.coverage.budget); a list the config does not set
    is its default's copy, so select.methods.coverage reaches the default entry."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    *parents, leaf = key.strip().split(".")
    node = raw
    for i, part in enumerate(parents):
        node = _child(node, part, parents[:i], key)
    if isinstance(node, list):
        node[_entry(node, leaf, parents, key)] = yaml.safe_load(value) if value.strip() else None
    else:
        node[leaf] = yaml.safe_load(value) if value.strip() else None


def _child(node, part: str, path: list[str], key: str):
    if isinstance(node, list):
        i = _entry(node, part, path, key)
        if isinstance(node[i], str):  # a method named alone: [coverage] -> [{name: coverage}]
            node[i] = {"name": node[i]}
        return node[i]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {key}: {'.'.join(path)} is not a section")
    if part not in node:
        node[part] = _default_list([*path, part]) or {}
    if not isinstance(node[part], dict | list):
        raise ConfigError(f"--set {key}: {'.'.join([*path, part])} is not a section")
    return node[part]


def _entry(items: list, part: str, path: list[str], key: str) -> int:
    """The index of `part` in a config list: a number, or the name of an entry."""
    where = ".".join(path)
    if part.isdigit():
        if int(part) >= len(items):
            raise ConfigError(f"--set {key}: {where} has {len(items)} entries; {part} is out of range")
        return int(part)
    names = [e if isinstance(e, str) else e.get("name") if isinstance(e, dict) else None for e in items]
    if part not in names:
        listed = ", ".join(str(n) for n in names if n is not None) or "none named"
        raise ConfigError(f"--set {key}: {where} has no entry {part!r} ({listed}); set {where} whole to add one")
    return names.index(part)


def _default_list(path: list[str]) -> list | None:
    """A copy of the default of `path` when it is a list of a section (select.methods), else None."""
    model = RunConfig
    for part in path[:-1]:
        field = model.model_fields.get(part)
        model = field.annotation if field else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    field = model.model_fields.get(path[-1])
    default = field.get_default(call_default_factory=True) if field else None
    return copy.deepcopy(default) if isinstance(default, list) else None


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_section_at(e["loc"][:-1]).model_fields)
            lines.append(f"{key}: unknown key (allowed keys: {allowed})")
        elif e["type"] == "value_error":
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            shown = "<secret>" if e["loc"][-1] in SECRET_KEYS else repr(e["input"])
            lines.append(f"{key}: {e['msg']} (got {shown})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _section_at(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] | None = RunConfig
    for part in loc:
        if isinstance(part, int):  # an index into a list of entries
            continue
        if model is None:  # select.methods: the entry's name picks its config
            model = METHODS[part].Config
            continue
        if model is SelectConfig and part == "methods":
            model = None
            continue
        annotation = model.model_fields[part].annotation
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        model = annotation
    return model
