"""The evaluate stage (`raysel evaluate`): does a selection train a better model?

Each method's selection, and `random` at the same budget as the control, fine-tunes the proxy once
per seed (raysel.core.finetune): a LoRA adapter through TRL's SFTTrainer, the loss on the responses
alone. The control is a fresh uniform draw of the pool for each seed, so its interval holds the luck
of the draw as well as the adapter's. The base model, without an adapter, is scored too.

Each fine-tune is a Ray task with the section's resources (one GPU each on a cluster: methods x seeds
run side by side). It commits its adapter (evaluate/adapters/<method>/<seed>/, loadable with peft)
and then its score on each eval set, each under its own marker through the executor's `commit`: a
crash redoes only the unfinished, and a new eval set trains nothing again. The layers below the
adapters (evaluate.lora_layers) are the base model's in every unit, so one task runs the eval sets
through them and every unit's eval pass resumes from there. Then results.parquet (one
row per method, seed, set and metric) and summary.json: per method and set, the mean over seeds with
its 95 % interval, and the paired difference against random on the same seeds with its interval.

The eval sets go through prepare as side sets (evaluate/sets/<name>/). They must be disjoint from
the pool and from what the methods read (targets, an anchor): a shared id or normalised instruction
is refused before any fine-tune."""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysel.core import paths
from raysel.core.finetune import (
    CUT,
    EvaluateConfig,
    bottom_states,
    exact_match,
    example,
    finetune,
    pad_id,
    response_nll,
    uses_bf16,
)
from raysel.core.intervals import mean_interval, paired_difference
from raysel.core.models import ModelConfig
from raysel.core.progress import Progress
from raysel.core.ray_adapter import Resources, log_to_driver
from raysel.core.section import ConfigError
from raysel.core.storage import Storage
from raysel.stages.base import Done, Stage, commit, committed, normalized

log = logging.getLogger(__name__)

CONTROL = "random"
BASE = "base"
BETTER = {"loss": "lower", "exact_match": "higher"}
ROW_COLUMNS = ["id", "messages", "text", "content_hash"]
BOTTOM_BYTES = 2 << 30  # the most eval-set states `bottoms` sends every unit (the object store holds one copy)


def set_folder(name: str) -> str:
    return posixpath.join(paths.EVALUATE, "sets", name)


def check_sets(cfg: EvaluateConfig) -> None:
    if not cfg.sets:
        raise ConfigError("evaluate.sets: name at least one eval set ({name, paths}), held out from the pool")


@dataclass(frozen=True)
class Unit:
    """One fine-tune (a selection or the control, at one seed), or the base model (seed None)."""

    method: str
    seed: int | None
    ids: tuple[str, ...] = ()  # what it trains on, in the selection's order
    budget: int = 0

    @property
    def name(self) -> str:
        return BASE if self.seed is None else f"{self.method}/seed-{self.seed}"

    def marker(self, part: str) -> str:
        return posixpath.join(paths.EVALUATE, "_done", self.name, f"{part}.json")

    @property
    def adapter(self) -> str:
        return posixpath.join(paths.EVALUATE, "adapters", self.method, str(self.seed))


@dataclass
class Plan:
    units: list[Unit]
    controls: dict[str, str]  # method -> the control at its budget
    train_keys: dict[str, dict]  # unit name -> what its adapter depends on
    eval_keys: dict[str, dict[str, dict]]  # unit name -> set -> what its score depends on


def instruction_key(messages, text) -> str:
    """The instruction as the overlap check compares it: the first user turn (or the text), lowercased,
    whitespace collapsed."""
    first = next((m["content"] for m in messages or [] if m["role"] == "user"), text or "")
    return re.sub(r"\s+", " ", first).strip().lower()


def digest(values) -> str:
    return hashlib.sha256("\n".join(values).encode()).hexdigest()[:16]


class Evaluate(Stage):
    name = "evaluate"
    needs = ("prepare", "select")
    brief = ("n_finetunes", "sets")
    side_until = "prepare"  # eval sets are read, never encoded

    def __init__(
        self, evaluate: EvaluateConfig, model: ModelConfig, chat_template: str, storage: Storage, force: bool = False
    ):
        self.cfg, self.model, self.chat_template, self.storage = evaluate, model, chat_template, storage
        self.force = force
        self._plan: tuple[str, Plan] | None = None

    def proxy(self) -> ModelConfig:
        return self.model.model_copy(update={"name": self.cfg.model or self.model.name})

    def side_sets(self) -> dict[str, list[str]]:
        return {set_folder(s.name): s.paths for s in self.cfg.sets}

    def resources(self) -> Resources:
        return Resources(batch_size=self.cfg.batch_size, num_cpus=self.cfg.num_cpus, num_gpus=self.cfg.num_gpus)

    def key(self, done: Done) -> dict:
        plan = self.plan(done)
        return {"train": plan.train_keys, "eval": plan.eval_keys}

    def plan(self, done: Done) -> Plan:
        """The fine-tunes and what each depends on; read once per set of records (key, then run)."""
        check_sets(self.cfg)
        stamp = json.dumps([done["select"]["key"], done["prepare"]["fingerprint"]], sort_keys=True)
        if self._plan is None or self._plan[0] != stamp:
            self._plan = (stamp, self._make_plan(done))
        return self._plan[1]

    def _make_plan(self, done: Done) -> Plan:
        budgets = {m: k for m, k in done["select"]["budgets"].items() if m != CONTROL}  # the control stands for it
        one = len(set(budgets.values())) <= 1
        controls = {m: CONTROL if one else f"{CONTROL}@{k}" for m, k in budgets.items()}
        picked = {m: tuple(self.column(paths.selection(m, "selected.parquet"), "id")) for m in budgets}
        pool = np.sort(np.array(self.column(paths.ACTIVATED, "id"), dtype=object))  # what the methods picked from
        units = [Unit(BASE, None)]
        for seed in range(self.cfg.seeds):
            for k in sorted(set(budgets.values())):
                draw = np.random.default_rng(seed).choice(len(pool), size=min(k, len(pool)), replace=False)
                units.append(Unit(CONTROL if one else f"{CONTROL}@{k}", seed, tuple(pool[draw].tolist()), k))
            units += [Unit(m, seed, picked[m], k) for m, k in budgets.items()]
        hashes = self.content_hashes({i for u in units for i in u.ids})
        proxy = {"proxy": self.proxy().name, "chat_template": self.chat_template}
        train_keys = {
            u.name: proxy | {"seed": u.seed, "settings": self.cfg.training(), "data": digest(hashes[i] for i in u.ids)}
            for u in units
            if u.seed is not None
        }
        scoring = {k: v for k, v in self.cfg.model_dump(mode="json").items()
                   if k in ("metrics", "max_tokens", "max_new_tokens", "dtype", "batch_size")} | {"cut": CUT}  # fmt: skip
        sets = {s.name: done[set_folder(s.name)]["prepare"]["fingerprint"] for s in self.cfg.sets}
        eval_keys = {
            u.name: {
                s: {"model": train_keys.get(u.name, proxy), "set": fp, "scoring": scoring} for s, fp in sets.items()
            }
            for u in units
        }
        return Plan(units, controls, train_keys, eval_keys)

    def content_hashes(self, ids: set[str]) -> dict[str, str]:
        """Each training sample's content hash: an adapter is keyed by what it read, not by its ids."""
        table = self.prepared(self.storage, ["id", "content_hash"], ids)
        return dict(zip(table["id"].to_pylist(), table["content_hash"].to_pylist()))

    def column(self, path: str, name: str) -> list:
        return pq.read_table(self.storage.path(path), columns=[name], filesystem=self.storage.fs)[name].to_pylist()

    @staticmethod
    def prepared(storage: Storage, columns: list[str], ids: set[str] | None = None) -> pa.Table:
        data = pads.dataset(storage.path(paths.PREPARED), format="parquet", filesystem=storage.fs)
        where = None if ids is None else pc.field("id").isin(pa.array(sorted(ids), pa.string()))
        return data.to_table(columns=columns, filter=where)

    def run(self, done: Done) -> dict:
        plan = self.plan(done)
        sets = {s.name: self.prepared(self.storage.child(set_folder(s.name)), ROW_COLUMNS) for s in self.cfg.sets}
        self.check_disjoint(sets, done["select"].get("side_sets", {}))
        rows = self.prepared(self.storage, ROW_COLUMNS, {i for u in plan.units for i in u.ids})
        by_id = dict(zip(rows["id"].to_pylist(), rows.select(["messages", "text"]).to_pylist()))
        eval_rows = {name: t.select(["messages", "text"]).to_pylist() for name, t in sets.items()}
        self.fine_tune(plan, by_id, eval_rows)
        results = self.results(plan)
        summary = summarize(results, plan.controls, {u.method: u.budget for u in plan.units})
        pq.write_table(pa.Table.from_pylist(results), self.storage.path(paths.EVALUATE, "results.parquet"),
                       filesystem=self.storage.fs)  # fmt: skip
        self.storage.write_json(posixpath.join(paths.EVALUATE, "summary.json"), summary)
        log.info("evaluate: %s", summary_line(summary))
        return {"n_finetunes": len(plan.train_keys), "sets": [s.name for s in self.cfg.sets], "summary": summary}

    def check_disjoint(self, sets: dict[str, pa.Table], side_sets: dict[str, dict[str, list[str]]]) -> None:
        """Refuse an eval set that shares an id or an instruction with the pool or a method's side set."""
        others = {"the pool": self.storage} | {
            f"{name} of {method}": self.storage.child(name) for method, s in side_sets.items() for name in s
        }
        for set_name, table in sets.items():
            ids = dict.fromkeys(table["id"].to_pylist())
            keys = {instruction_key(m, t): i for i, m, t in zip(ids, table["messages"].to_pylist(), table["text"].to_pylist())}  # fmt: skip
            for label, storage in others.items():
                data = pads.dataset(storage.path(paths.PREPARED), format="parquet", filesystem=storage.fs)
                for batch in data.to_batches(columns=["id", "messages", "text"]):
                    for i, m, t in zip(*(batch.column(c).to_pylist() for c in ("id", "messages", "text"))):
                        key = instruction_key(m, t)
                        if i in ids or key in keys:
                            what = f"id {i!r}" if i in ids else f"the instruction of {keys[key]!r}"
                            raise ConfigError(
                                f"evaluate.sets: {set_name} shares {what} with {label} (id {i!r}); an eval set "
                                "must be held out from the pool and from the methods' targets"
                            )

    def fine_tune(self, plan: Plan, rows: dict[str, dict], eval_rows: dict[str, list[dict]]) -> None:
        """Every unit with a marker missing, as Ray tasks with the section's resources."""
        import ray

        def finished(u: Unit) -> bool:
            parts = [("train", plan.train_keys.get(u.name))] if u.seed is not None else []
            parts += list(plan.eval_keys[u.name].items())
            return all(committed(self.storage, u.marker(p), k) is not None for p, k in parts)

        pending = [u for u in plan.units if not finished(u)]
        self.refuse_or_replace([u for u in pending if u.seed is not None], plan)
        tuned = sum(u.seed is not None for u in pending)
        log.info("evaluate: %d of %d fine-tunes to run%s; %s", tuned, len(plan.train_keys),
                 " and the base model" if len(pending) > tuned else "",
                 f"{self.cfg.num_gpus:g} GPU each" if self.cfg.num_gpus else f"{self.cfg.num_cpus:g} CPU each")  # fmt: skip
        if not pending:
            return
        resources = {"num_cpus": self.cfg.num_cpus, "num_gpus": self.cfg.num_gpus}
        sets = ray.put(eval_rows)
        # every unit waits for it: the eval sets through the layers below the adapters, once for all
        below = ray.remote(bottoms).options(**resources).remote(sets, self.cfg, self.proxy(), self.chat_template)
        refs = {
            ray.remote(run_unit).options(**resources).remote(
                self.storage, u, plan.train_keys.get(u.name), plan.eval_keys[u.name], [rows[i] for i in u.ids],
                sets, below, self.cfg, self.proxy(), self.chat_template): u
            for u in pending
        }  # fmt: skip
        progress = Progress("evaluate", len(refs), sum(len(u.ids) for u in pending), "fine-tunes", "samples", 60)
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            ray.get(ready[0])
            progress.update(len(refs.pop(ready[0]).ids))
        progress.close()

    def refuse_or_replace(self, units: list[Unit], plan: Plan) -> None:
        """An adapter trained under another proxy, settings or data is minutes of work (hours on a
        large proxy): replaced only with --force."""
        stale = {}
        for u in units:
            held, key = (
                (self.storage.read_json(u.marker("train")) or {}).get("key"),
                normalized(plan.train_keys[u.name]),
            )
            if held is not None and held != key:
                stale[u.name] = [k for k, v in key.items() if held.get(k) != v]
        if stale and not self.force:
            first, parts = next(iter(stale.items()))
            raise ConfigError(
                f"evaluate: {len(stale)} adapter(s) under {self.storage.uri(paths.EVALUATE)} were trained under "
                f"another {', '.join(parts)} (first: {first}); nothing was removed. Set output.root to a new "
                f"folder to keep them, or pass --force to train them again"
            )

    def results(self, plan: Plan) -> list[dict]:
        """One row per unit, seed, set and metric, from the committed markers."""
        out = []
        for u in plan.units:
            for s in plan.eval_keys[u.name]:
                for metric, score in self.storage.read_json(u.marker(s))["scores"].items():
                    out.append({"method": u.method, "seed": u.seed, "set": s, "metric": metric, "budget": u.budget,
                                "value": score["value"], "n": score["n"]})  # fmt: skip
        return out


def load_proxy(cfg: EvaluateConfig, proxy, chat_template):
    """In a Ray task: the proxy model, its tokenizer and chat template, and whether it runs in bf16."""
    import torch

    from raysel.core.models import load_model, load_tokenizer
    from raysel.core.records import chat_template_for

    log_to_driver()  # its progress (trained, loss) reaches the driver's log
    if cfg.device() == "cpu":
        torch.set_num_threads(max(1, int(cfg.num_cpus)))
    bf16 = uses_bf16(cfg.dtype, cfg.device())  # resolved here, on the hardware the task got
    tokenizer = load_tokenizer(proxy)
    # master weights in fp32 on a CPU (autocast does the bf16 matmuls there); in bf16 on a GPU that has it
    base = load_model(proxy.model_copy(update={"dtype": "bfloat16" if bf16 and cfg.device() == "cuda" else "float32"}),
                      cfg.device())  # fmt: skip
    return base, tokenizer, chat_template_for(tokenizer, chat_template), bf16


def loss_examples(tokenizer, template, rows: list[dict], cfg: EvaluateConfig) -> list[dict]:
    return [e for r in rows if (e := example(tokenizer, template, r["messages"], r["text"], cfg.max_tokens))]


def bottoms(eval_rows: dict[str, list[dict]], cfg: EvaluateConfig, proxy, chat_template) -> dict:
    """One Ray task: each eval set's bottom_states, the layers below the adapters (evaluate.lora_layers) run
    once on the base proxy for every adapter's score; {} when the adapters reach the bottom, or the states
    would take more than BOTTOM_BYTES to send to the units."""
    if "loss" not in cfg.metrics or not cfg.lora_layers:
        return {}
    base, tokenizer, template, bf16 = load_proxy(cfg, proxy, chat_template)
    n = base.config.num_hidden_layers - min(cfg.lora_layers, base.config.num_hidden_layers)
    out = {}
    for name, rows in eval_rows.items() if n > 0 else ():
        out[name] = bottom_states(base, loss_examples(tokenizer, template, rows, cfg), cfg.batch_size,
                                  pad_id(tokenizer), n, bf16)  # fmt: skip
        held = sum(t.numel() * t.element_size() for b in out.values() if b for t in b[1])
        if held > BOTTOM_BYTES:
            log.info("evaluate: the eval sets' states below the adapters pass %d MB; each unit runs them itself",
                     BOTTOM_BYTES >> 20)  # fmt: skip
            return {}
    if out:
        log.info("evaluate: the eval sets through the proxy's bottom %d of %d layers once, for every unit's score",
                 n, base.config.num_hidden_layers)  # fmt: skip
    return out


def run_unit(
    storage, unit, train_key, eval_keys, train_rows, eval_rows, below, cfg: EvaluateConfig, proxy, chat_template
):
    """One Ray task: train the unit's adapter unless committed, then score each eval set not yet scored
    (`below`: bottoms' states of the sets, where it has them)."""
    base, tokenizer, template, bf16 = load_proxy(cfg, proxy, chat_template)
    held = {"model": base}

    def train() -> dict:
        for name in eval_keys:  # scores of an adapter this one replaces
            storage.remove(unit.marker(name))
        examples = loss_examples(tokenizer, template, train_rows, cfg)
        with tempfile.TemporaryDirectory(prefix="raysel-adapter-") as out:
            record = finetune(base, tokenizer, examples, cfg, unit.seed, out)
            storage.remove(unit.adapter)
            storage.fs.create_dir(storage.path(unit.adapter), recursive=True)
            pafs.copy_files(out, storage.path(unit.adapter), pafs.LocalFileSystem(), storage.fs)
        held["model"] = record.pop("model")
        log.info("evaluate: %s trained on %d samples, loss %s -> %s", unit.name, len(examples),
                 record["first_loss"], record["last_loss"])  # fmt: skip
        return record | {"n_skipped": len(train_rows) - len(examples)}

    if unit.seed is not None:
        commit(storage, unit.marker("train"), train_key, train)
        if held["model"] is base:  # trained in an earlier attempt: its adapter from storage
            held["model"] = load_adapter(base, storage, unit.adapter)
    model = held["model"].eval()
    for name, key in eval_keys.items():
        commit(storage, unit.marker(name), key, lambda name=name: {
            "scores": score(model, tokenizer, template, eval_rows[name], cfg, bf16, below.get(name))})  # fmt: skip
    return unit.name


def load_adapter(model, storage: Storage, folder: str):
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="raysel-adapter-") as local:
        pafs.copy_files(storage.path(folder), local, storage.fs, pafs.LocalFileSystem())
        return PeftModel.from_pretrained(model, local)


def score(model, tokenizer, template, rows: list[dict], cfg: EvaluateConfig, bf16: bool, bottom=None) -> dict:
    """The configured metrics of one model on one eval set (`bottom`: its bottom_states, or None)."""
    out = {}
    if "loss" in cfg.metrics:
        examples = loss_examples(tokenizer, template, rows, cfg)
        total, count = response_nll(model, examples, cfg.batch_size, pad_id(tokenizer), bf16, bottom)
        out["loss"] = {"value": total / count if count else None, "n": count}
    if "exact_match" in cfg.metrics:
        right, asked = exact_match(model, tokenizer, template, rows, cfg.max_new_tokens, cfg.batch_size)
        out["exact_match"] = {"value": right / asked if asked else None, "n": asked}
    return out


def summarize(results: list[dict], controls: dict[str, str], budgets: dict[str, int]) -> dict:
    """Per method, set and metric: the mean over seeds with its interval, and the paired difference
    against the control at the method's budget; the base model's scores beside them."""
    values: dict[tuple, dict[int, float]] = {}
    for r in results:
        if r["value"] is not None and r["seed"] is not None:
            values.setdefault((r["method"], r["set"], r["metric"]), {})[r["seed"]] = r["value"]
    by_method: dict[str, dict] = {}
    for (method, s, metric), seeds in sorted(values.items()):
        entry = mean_interval(seeds.values())
        control = controls.get(method)
        if control is not None:
            diff = paired_difference(seeds, values.get((control, s, metric), {}))
            entry |= {"delta_vs_random": diff and diff["mean"], "delta_ci": diff and diff["ci"]}
        by_method.setdefault(method, {}).setdefault(s, {})[metric] = entry
    base = {}
    for r in results:
        if r["seed"] is None:
            base.setdefault(r["set"], {})[r["metric"]] = r["value"]
    return {"by_method": by_method, "base": base, "controls": controls, "budgets": budgets, "better": BETTER}


def summary_line(summary: dict) -> str:
    """Each method's loss against random per set, for the log."""
    parts = []
    for method, sets in summary["by_method"].items():
        for s, metrics in sets.items():
            m = metrics.get("loss") or next(iter(metrics.values()))
            delta = m.get("delta_vs_random")
            parts.append(f"{method}/{s} {m['mean']:.4f}" + ("" if delta is None else f" ({delta:+.4f} vs random)"))
    return "; ".join(parts)
