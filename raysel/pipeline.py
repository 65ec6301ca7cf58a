"""The whole job as one declared plan: the stages in order, each built from the config sections it
reads, each declaring the stages it needs. A verb names its target stages; the executor
(stages/base.py) runs their `needs` closure in plan order, skipping what is committed, and the run
manifest is written last. Side sets (targets, an anchor, a reference) go through the same plan up to
stats, under <root>/<name>/, with the run's tau.

    prepare ─► [train_sae] ─► encode ─► tau ─► stats ─┬─► task_features ─┬─► fac ─► synthesis
                                                       └─► select ◄───────┘ (method fac reads F)
                                                             ├─► spans ─► report
                                                             └─► evaluate (proxy fine-tunes)
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from raysel.config import ActivationConfig, RunConfig
from raysel.core import paths
from raysel.core.corpus import list_input_files
from raysel.core.features import FeatureStore
from raysel.core.generation import check_vllm
from raysel.core.ray_adapter import init_ray, quiet_off_a_terminal
from raysel.core.sae import default_sae_source
from raysel.core.storage import Storage, StorageError, redact
from raysel.stages.base import Done, Executor, Stage, closure
from raysel.stages.encode import Encode, EncodeJob, encode_jobs
from raysel.stages.evaluate import Evaluate, check_sets
from raysel.stages.fac import MeasureFAC
from raysel.stages.prepare import Prepare, check_root
from raysel.stages.report import Report
from raysel.stages.select import Select, run_counts
from raysel.stages.spans import Spans
from raysel.stages.stats import Calibrate, Stats
from raysel.stages.synthesis import Synthesize
from raysel.stages.task_features import TaskFeatures
from raysel.stages.train_sae import TrainSAE

log = logging.getLogger(__name__)

PACKAGES = ("raysel", "ray", "torch", "transformers", "sae-lens", "datasets", "pyarrow", "numpy")


@dataclass
class Target:
    """Where one set of samples goes through the plan: the run's input, or a side set."""

    cfg: RunConfig
    storage: Storage
    side_sets: SideSets
    side: bool = False  # a side set: known by its content (small, edited in place), at the run's tau
    force: bool = False  # --force: outputs of another input or config may be removed and redone
    run: dict = field(default_factory=dict)  # what manifests carry of the run: config, versions, model


# The plan: every stage in the order a run reaches it, and how each is built from the sections it reads.
PLAN: tuple[tuple[type[Stage], Callable[[Target], Stage]], ...] = (
    (Prepare, lambda t: Prepare(t.cfg.input, t.cfg.prepare, t.cfg.model, t.cfg.s3, t.storage, by_content=t.side)),
    (TrainSAE, lambda t: TrainSAE(t.cfg.stack(), t.storage)),
    # a side set is small (force); the run's own pass takes along the side sets its later stages read
    (Encode, lambda t: Encode(t.cfg.stack(), t.storage, t.force or t.side, None if t.side else t.side_sets.riders)),
    (Calibrate, lambda t: Calibrate(t.storage, t.cfg.activation)),
    (Stats, lambda t: Stats(t.storage, t.cfg.stats.top_n)),
    (TaskFeatures, lambda t: TaskFeatures(t.cfg.fac, t.cfg.stack(), t.storage)),
    (Select, lambda t: Select(t.cfg.select, t.cfg.fac, t.cfg.stack(), t.storage, t.run, t.side_sets.stores)),
    (Spans, lambda t: Spans(t.cfg.stack(), t.cfg.select, t.storage)),
    (MeasureFAC, lambda t: MeasureFAC(t.cfg.fac, t.cfg.stack(), t.storage)),
    (Synthesize, lambda t: Synthesize(t.cfg.synthesis, t.cfg.fac, t.cfg.stack(), t.storage, t.run)),
    (Evaluate, lambda t: Evaluate(t.cfg.evaluate, t.cfg.model, t.cfg.prepare.chat_template, t.storage, t.force)),
    (Report, lambda t: Report(t.storage, t.run)),
)
STAGES: tuple[str, ...] = tuple(cls.name for cls, _ in PLAN)

# Each verb of the CLI and the stages it targets; `report` joins run, demo and evaluate where output.report is set.
VERBS: dict[str, tuple[str, ...]] = {
    "run": ("select",),
    "demo": ("select",),
    "encode": ("encode",),
    "select": ("select",),
    "train-sae": ("train_sae",),
    "fac": ("fac",),
    "synthesize": ("synthesis",),
    "evaluate": ("evaluate",),
    "report": ("report",),
}


def verb_targets(verb: str, cfg: RunConfig) -> list[str]:
    """The plan's stages a verb targets; run, demo and evaluate write the report too, unless output.report is off."""
    return [*VERBS[verb], *(["report"] if verb in ("run", "demo", "evaluate") and cfg.output.report else [])]


def build(target: Target) -> list[Stage]:
    return [make(target) for _, make in PLAN]


class SideSets:
    """Side sets through the plan up to stats, each once per run, under <root>/<name>/. Those the run's
    stages read ride along in its own encode pass when that is due (`ahead`); else the ones a stage needs
    at once are encoded together, in one pass of the encoders."""

    def __init__(self, cfg: RunConfig, storage: Storage):
        self.cfg, self.storage, self.done = cfg, storage, {}
        self.ahead: dict[str, list[str]] = {}  # the run sets it from its plan (encoded_sides)
        self.prepared: dict[tuple, Done] = {}  # (name, paths) -> the set's prepare record, keyed once a run

    def target(self, name: str, paths_: list[str], tau: float) -> Target:
        side = self.cfg.model_copy(
            update={
                "input": self.cfg.input.model_copy(update={"paths": list(paths_), "hf_dataset": None}),
                "activation": ActivationConfig(tau=tau),  # activation means the same in both
            }
        )
        return Target(side, self.storage.child(name), self, side=True)

    def records(self, sets: dict[str, list[str]], tau: float, until: str = "stats") -> dict[str, Done]:
        plans = {
            name: build(self.target(name, paths_, tau))
            for name, paths_ in sets.items()
            if (name, tuple(paths_), until) not in self.done
        }
        prepared = {n: self.prepared[(n, tuple(sets[n]))] for n in plans if (n, tuple(sets[n])) in self.prepared}
        if len(plans) > 1 and STAGES.index(until) > STAGES.index("encode"):
            prepared = encode_together(plans, prepared)
        for name, plan in plans.items():
            done = Executor(plan, given=prepared.get(name)).run([until])
            log.info("%s: %d examples %s", name, *((done["encode"]["n_encoded"], "encoded") if "encode" in done
                                                   else (done["prepare"]["n_valid"], "prepared")))  # fmt: skip
            self.done[(name, tuple(sets[name]), until)] = done
        return {name: self.done[(name, tuple(paths_), until)] for name, paths_ in sets.items()}

    def riders(self) -> list[EncodeJob]:
        """The `ahead` sets prepared, and what is left to encode of them, for the run's own encode pass.
        Their tau is not read before stats; each set's own encode stage later finds its shards committed."""
        plans = {name: build(self.target(name, paths_, 0.0)) for name, paths_ in self.ahead.items()}
        prepared, jobs = prepared_jobs(plans)
        self.prepared |= {(name, tuple(self.ahead[name])): done for name, done in prepared.items()}
        return jobs

    def for_stage(self, sets: dict[str, list[str]], done: Done, until: str = "stats") -> dict[str, Done]:
        """The executor's hook: a stage's side sets up to `until`, at the run's tau (the stage needs stats)."""
        return self.records(sets, done["stats"]["tau"], until)

    def stores(self, sets: dict[str, list[str]], tau: float) -> dict[str, FeatureStore]:
        """Methods' side inputs, encoded on demand."""
        self.records(sets, tau)
        return {name: FeatureStore(self.storage.child(name)) for name in sets}


def encode_together(plans: dict[str, list[Stage]], known: dict[str, Done]) -> dict[str, Done]:
    """Prepare each side set, then encode what is left of them in one pass (encode_jobs): a FAC run has
    two to four side sets, and a pass of each would load the model on every actor again. Each set's
    encode stage then finds its shards committed. Returns each set's prepare record (`known`: those
    prepared already), so that it is not keyed (its files read) again."""
    prepared, jobs = prepared_jobs(plans, known)
    if len(jobs) > 1:
        encode = next(stage for stage in next(iter(plans.values())) if isinstance(stage, Encode))
        encode_jobs(encode.stack, jobs, encode.judge_fit)
    return prepared


def prepared_jobs(
    plans: dict[str, list[Stage]], known: dict[str, Done] | None = None
) -> tuple[dict[str, Done], list[EncodeJob]]:
    """Each set prepared, unless `known` has its record (the records by name), and the encode jobs of
    those with shards left."""
    prepared, jobs = {}, []
    for name, plan in plans.items():
        prepared[name] = (known or {}).get(name) or Executor(plan).run(["prepare"])
        jobs.append(next(stage for stage in plan if isinstance(stage, Encode)).job(prepared[name]))
    return prepared, [job for job in jobs if job.todo]


def run(
    cfg: RunConfig, until: str | Sequence[str] = "select", train_missing_sae: bool = False, force: bool = False
) -> dict:
    """Run the plan toward the `until` stage(s); finished ones are skipped. A root holding a run of
    other input files, or features of another config, is refused unless `force`."""
    storage = Storage(cfg.output.root, cfg.s3)
    storage.check()
    check_root(storage, [f.path for f in list_input_files(cfg.input, cfg.s3)[1]], force)
    init_ray(cfg.ray)
    targets = [until] if isinstance(until, str) else list(until)
    if train_missing_sae and default_sae_missing(cfg):
        targets.insert(0, "train_sae")
    try:
        return run_stages(cfg, storage, targets, force=force)
    except OSError as err:
        if "AWS Error" not in str(err):
            raise
        raise StorageError(
            f"output root {storage.uri()}: {redact(str(err), cfg.s3)}; finished work is committed, re-run to resume"
        ) from None


def default_sae_missing(cfg: RunConfig) -> bool:
    return cfg.sae.path is None and not cfg.sae.release and default_sae_source(cfg.stack()) is None


def run_stages(
    cfg: RunConfig, storage: Storage, targets: list[str], given: Done | None = None, force: bool = False
) -> dict:
    log.info("run: output at %s (targets: %s)", storage.uri(), ", ".join(targets))
    if "synthesis" in targets and cfg.synthesis.engine == "vllm":
        check_vllm()  # before any work
    if "evaluate" in targets:
        check_sets(cfg.evaluate)
    sides = SideSets(cfg, storage)
    run_info = {"config": cfg.public_dict(), "versions": versions(), "model": cfg.model.name}
    stages = build(Target(cfg, storage, sides, run=run_info, force=force))
    sides.ahead = encoded_sides(stages, targets)
    with quiet_off_a_terminal():
        done = Executor(stages, sides.for_stage, given).run(targets)
    manifest = run_info | {
        "output": storage.uri(),
        "stages": done,
        "counts": run_counts(done),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_json(paths.MANIFEST, manifest)
    log.info("run: done; manifest at %s", storage.uri(paths.MANIFEST))
    return manifest


def encoded_sides(stages: list[Stage], targets: list[str]) -> dict[str, list[str]]:
    """The side sets that the stages toward `targets` encode, by name (the first stage's paths of a name)."""
    sets: dict[str, list[str]] = {}
    for stage in closure(stages, targets):
        if STAGES.index(stage.side_until) > STAGES.index("encode"):
            sets |= {name: p for name, p in stage.side_sets().items() if p and name not in sets}
    return sets


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
