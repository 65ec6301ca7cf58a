"""The run's typed config: one pydantic model per section, loaded from YAML with
`--set section.key=value` overrides. Every problem is reported before any work
starts, as `key.path: what is wrong (what is allowed)`."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator

from raysel.core.models import EMBEDDED_MODEL
from raysel.core.section import ConfigError, Section
from raysel.methods import LEGACY_KEYS, METHODS, MethodEntry
from raysel.methods.fac import FACConfig, FACSelectConfig

SECRET_KEYS = {"access_key", "secret_key"}
__all__ = ["ConfigError", "RunConfig", "load_config"]


class FieldMap(Section):
    """Which column of an input record holds each part of a sample."""

    id: str | None = None  # None: the id is a hash of the normalised content
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"
    messages: str = "messages"
    role: str = "role"
    content: str = "content"
    text: str = "text"


class InputConfig(Section):
    paths: list[str] = Field(default_factory=list)  # files, directories, globs, s3:// URIs
    hf_dataset: str | None = None  # a hub dataset id, read through `datasets`
    hf_split: str = "train"
    format: Literal["auto", "jsonl", "json", "parquet", "hf_disk"] = "auto"
    shape: Literal["auto", "alpaca", "messages", "text"] = "auto"
    fields: FieldMap = FieldMap()

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, v):
        return [v] if isinstance(v, str) else v


class PrepareConfig(Section):
    chat_template: Literal["auto", "fallback"] = "auto"  # auto: the tokenizer's, else the fallback
    max_tokens: int = Field(512, gt=0)
    dedup: bool = True  # reject exact duplicate texts
    batch_size: int = Field(512, gt=0)  # rows per formatting task; tasks run on every free CPU
    rows_per_file: int = Field(1024, gt=0)  # rows per prepared file: the encoder's unit of work and resume
    max_row_bytes: int = Field(16 << 20, ge=1024)  # a larger row is rejected as too_large, its head kept


class ModelConfig(Section):
    name: str = EMBEDDED_MODEL  # the embedded default, an HF hub id, or a local directory
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache_dir: str = str(Path.home() / ".cache" / "raysel")


class SAESection(Section):
    """Which SAE reads the model: a saved one, a published one, or the default
    that `raysel train-sae` makes for the configured model."""

    path: str | None = None  # a directory (local or any location URI) saved by sae-lens or sparsify; safetensors only
    format: Literal["auto", "sae_lens", "sparsify"] = "auto"  # auto: told by the weights file in sae.path
    release: str | None = None  # a sae-lens pretrained release, with sae_id (needs a hub)
    sae_id: str | None = None
    hook_layer: int | None = Field(None, ge=0)  # overrides the layer in the SAE's metadata
    allow_poor_fit: bool = False  # encode even when the SAE's explained variance on the first samples is below 0

    @model_validator(mode="after")
    def _one_source(self):
        if self.path and self.release:
            raise ValueError("sae: set sae.path or sae.release, not both")
        if bool(self.release) != bool(self.sae_id):
            raise ValueError("sae: sae.release and sae.sae_id go together")
        return self


class TrainSAEConfig(Section):
    """`raysel train-sae`: a TopK SAE trained with sae-lens on the prepared corpus."""

    layer: int = Field(15, ge=0)  # the SAE reads the residual stream after this block
    d_sae: int = Field(2048, gt=0)
    k: int = Field(32, gt=0)
    training_tokens: int = Field(120_000, gt=0)  # sized to finish in under 3 minutes on 2 CPU cores
    context_size: int = Field(256, gt=0)
    batch_size_tokens: int = Field(256, gt=0)
    lr: float = Field(1e-3, gt=0)
    seed: int = 42
    output: str | None = None  # None: the cache dir, where runs find the default SAE


class EncodeConfig(Section):
    actors: int = Field(1, gt=0)  # one model + SAE each; on GPU nodes, one per GPU
    num_gpus: float = Field(1.0, ge=0)  # per actor when the cluster has GPUs; fractions share one
    num_cpus: float = Field(1.0, gt=0)  # per actor
    memory_gb: float = Field(4.0, gt=0)  # heap per actor, reserved with Ray
    resources: dict[str, float] = {}  # custom Ray resources per actor, e.g. {"encoder": 1}: pins actors to a node group
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tokens_per_batch: int = Field(8192, gt=0)  # padded tokens per forward pass
    skip_prefix: bool = True  # leave the chat template's shared prefix out of pooling
    top_m: int | None = Field(None, gt=0)  # keep only the M strongest features per sample


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
        names = [e.name for e in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"select.methods: {', '.join(twice)} listed twice; each method writes selection/<name>/ once"
            )
        return v


class SynthConfig(Section):
    """`raysel synthesize`: new samples for the features FAC finds missing (two steps, contrastive)."""

    generator: str | None = None  # a causal LM (local dir, HF id, or the embedded default); None: model.name
    max_features: int = Field(20, gt=0)  # missing features to write for, most common on the anchor first
    spans: int = Field(5, gt=0)  # top-activating spans shown to the generator in step 1
    n_candidates: int = Field(8, gt=0)  # step 1: samples per feature, scored to find x+ and x-
    n_contrastive: int = Field(8, gt=0)  # step 2: samples from the contrastive prompt
    keep: int = Field(2, gt=0)  # per feature, the strongest step-2 samples above delta
    delta: float | None = None  # activation a kept sample must exceed; None: activation.tau
    temperature: float = Field(0.8, gt=0)
    retry_temperature: float = Field(1.2, gt=0)  # a step 1 whose samples all score 0 is redone once at this
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(160, gt=0)
    seed: int = 0
    actors: int = Field(1, gt=0)  # actors holding the generator and the run's model + SAE (vllm: engine replicas)
    engine: Literal["transformers", "vllm"] = "transformers"  # vllm: ray.data.llm's vLLM processor, on GPU nodes


class S3Config(Section):
    """Settings for every s3:// location, input and output alike. Credentials
    fall back to the standard AWS environment variables."""

    endpoint_override: str | None = None  # host:port of an S3-compatible store
    scheme: Literal["https", "http"] = "https"
    region: str | None = None
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    max_attempts: int = Field(5, gt=0)  # retries of a throttled or failed request
    connect_timeout: float = Field(5.0, gt=0)  # seconds; a wrong endpoint fails fast
    outage_seconds: float = Field(120.0, ge=0)  # how long a shard's reads and writes retry through an outage


class OutputConfig(Section):
    root: str = "runs/default"  # a local folder or s3://bucket/prefix
    report: bool = True  # `raysel run` and `raysel demo` write report.html at the root


class RayConfig(Section):
    address: str | None = None  # None: the cluster of RAY_ADDRESS, or a new local one
    num_cpus: int | None = Field(None, gt=0)  # only for a new local cluster


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
    synth: SynthConfig = SynthConfig()
    s3: S3Config = S3Config()
    output: OutputConfig = OutputConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="before")
    @classmethod
    def _no_legacy_keys(cls, raw):
        """Settings that moved into a method's entry name their new place."""
        if isinstance(raw, dict):
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


class ModelStack(Section):
    """What a component that runs the model and its SAE reads (the encoder, spans, IGDS's metric, the
    judge and generator): the run's model, SAE, encode and prepare sections, and the input's shape."""

    model: ModelConfig
    sae: SAESection
    train_sae: TrainSAEConfig  # where the default SAE lives when sae.* names none
    encode: EncodeConfig
    prepare: PrepareConfig
    s3: S3Config
    shape: str  # the input's shape: plain text has no chat-template prefix to skip


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    raw = _read_yaml(path) if path else {}
    for item in overrides:
        _apply_override(raw, item)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


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
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    *parents, leaf = key.strip().split(".")
    node = raw
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parents[: i + 1])} is not a section")
    node[leaf] = yaml.safe_load(value) if value.strip() else None


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
