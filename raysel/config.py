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

    tau: float = Field(0.0, ge=0)
    """a feature is activated in a sample when its max-pool exceeds τ; statistics and selection share it"""
    target_active: float | None = Field(None, gt=0)
    """calibrate τ instead, on the feature store: samples then average this many activated features"""
    calibrate_rows: int | None = Field(100_000, gt=0)
    """τ for `target_active` is calibrated on about this many samples: whole shards, evenly spaced through the store
    (every shard when it holds fewer; `null`: always every shard). At 1M samples the sampled τ was 3.84885 against
    the whole store's 3.84951, and the store then averaged 64.0 activated features; the stats stage reports the mean
    the whole store reaches"""


class StatsConfig(Section):
    top_n: int = Field(10, gt=0)
    """top-activating samples kept per feature"""


class SelectConfig(Section):
    """Which selection methods run, and what they share. An entry is a method's name, or a mapping
    with its name and its own settings: [coverage, {name: mona, targets: [t.jsonl]}] (see raysel.methods)."""

    methods: list[MethodEntry] = Field(["coverage", "random", "longest"], validate_default=True)
    """the selections to write: a list of method entries, each a name (`coverage`) or a mapping with its name and its
    own settings (`{name: mona, targets: [t.jsonl]}`); the methods are `coverage`, `simscale`, `random`, `longest`,
    `mona`, `igds`, `fac`, `kcenter` and `dense` (see [Selection methods](config.md#selection-methods)). Each writes
    `selection/<name>/`, so a name appears once; `random` and `longest` are always computed as baselines"""
    budget: float = Field(0.1, gt=0)
    """a count (≥ 1) or a fraction of the encoded pool (< 1); an entry's own `budget` wins"""
    seed: int = 0
    """seed of `random`, `kcenter`'s first pick, RandGreeDi's partitioning, `fac`'s random baseline and fill, and of the
    hash of the ids that breaks ties wherever a ranking is cut (`mona` and `igds`'s top k, `longest`, `fac`,
    `simscale`'s and `dense`'s visit order, `coverage`'s greedy, on one node and under RandGreeDi, and `kcenter`'s
    farthest sample), never the id order, which fills a tie with one source first"""
    memory_check: bool = True
    """before reading the pool, estimate the driver memory it needs from the statistics' counts: 4 B per activated
    sample-feature pair (the CSR's int32 entries, read once and in place), 260 B per sample plus 3 B per character of
    its id (the ids' mean length is sampled from the activated sets), and 1 GiB for the driver process itself
    (measured at 10M samples: reading the pool peaked at 4.98 GiB), plus the largest of what is held beside the pool:
    the picks' original records (300 B a pick, and 10 copies of the 20,000 that the selection writer reads and parses
    at a time, their mean size from the prepared shards' footers: the records themselves are spilled to local files,
    one per method and part, in one pass over the prepared shards), or one of the chosen methods: `coverage` its
    greedy's inverted index and per-row gains (4 B an entry, 90 B a row) on one node, only RandGreeDi's m·k
    candidates when it distributes; `simscale` its rarity ranks and postings (8 B an entry), and per kept sample its
    bitmask of popular features (at most 512 B) and 12 B of counters a thread; `kcenter` holds every stored entry of
    the store, 15 B each and 300 B a sample, measured; `dense` holds the samples' d_in-wide float32 vectors twice
    while they arrive. It refuses, naming the remedies (`distributed: on` when coverage holds most, a lower budget
    when the records do, else leave out the method that holds most; fewer activated features a sample: a lower
    `activation.target_active` or a higher `activation.tau`; a larger head), when this machine has less free; the
    estimate, per method too, is in the select stage's summary"""

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
    root: str = "runs/default"
    """a local folder, `s3://bucket/prefix`, or any location of the Locations list"""
    report: bool = True
    """`raysel run`, `raysel demo` and `raysel evaluate` write `report.html` (and `report.json`) at the root"""


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
