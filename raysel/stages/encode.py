"""The encode stage: prepared samples to the feature store (core/features.py), on a Ray actor pool
of encoders (core/encoder.py).

One features/ shard per prepared file, under the same name, with its span candidates in
features/_spans/ (core/spans.py), then its marker in features/_done/, all through the one commit
mechanism (stages/base.py). A re-run encodes only the shards
without a marker of the current fingerprint."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from raysel.config import ModelStack
from raysel.core import paths
from raysel.core.corpus import fingerprint
from raysel.core.encoder import SKIPPED, Encoder
from raysel.core.features import DENSE, FEATURE_SCHEMA, FeatureStore
from raysel.core.progress import Progress
from raysel.core.ray_adapter import Resources, log_to_driver, map_stage, model_resources
from raysel.core.sae import check_against_model, sae_metadata, weights_digest
from raysel.core.section import ConfigError
from raysel.core.spans import CANDIDATE_SCHEMA, TOP, WINDOW, TopSpans
from raysel.core.storage import Storage, StorageError
from raysel.stages.base import Done, Stage, commit

log = logging.getLogger(__name__)


SHARD_RESULT = pa.schema(
    [("job", pa.int64()), ("shard", pa.string()), ("rows", pa.int64()), ("error", pa.string()),
     ("explained_variance", pa.float64()), ("l0", pa.float64())]
)  # fmt: skip
FIT_SAMPLES = 32  # samples of each actor's first shard that the fit check reads
POOR_FIT = 0.5  # explained variance below this warns; below 0 stops the run unless sae.allow_poor_fit


@dataclass(frozen=True)
class EncodeJob:
    """One store's shards left to encode, and what the encoders commit them under."""

    root: str
    key: dict  # the shard markers' key: the store's fingerprint
    parts: dict  # what that fingerprint is made of, by name, kept in each marker
    dtype: str | None  # the dtype of the store's committed shards, which the rest must match
    shards: tuple[str, ...]  # every prepared shard of the store
    todo: tuple[str, ...]  # the ones without a marker of this key
    rows: int  # the samples in `todo`, for the progress line


class EncodeShards:
    """Ray work: each input row names a job (a store) and one of its prepared files; encode the file,
    write its features shard, then its marker."""

    def __init__(self, stack: ModelStack, jobs: list[EncodeJob]):
        log_to_driver()
        self.encoder = Encoder(stack)
        self.jobs, self.storages = jobs, [Storage(job.root, stack.s3) for job in jobs]
        self.dtype = str(self.encoder.model.dtype).removeprefix("torch.")
        self.measured = False  # the fit check runs on this actor's first shard

    def refusal(self, job: EncodeJob) -> str | None:
        """auto on CPUs of another kind than the store's first shards': no shard is mixed"""
        if job.dtype and self.dtype != job.dtype:
            return (f"the actor on node {ray.get_runtime_context().get_node_id()[:12]} runs the model in "
                    f"{self.dtype}, the store's shards were encoded in {job.dtype}; set model.dtype: {job.dtype}")  # fmt: skip
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        done = []
        for i, shard in zip(batch["job"].to_pylist(), batch["shard"].to_pylist()):
            refusal = self.refusal(self.jobs[i])
            if refusal:
                done.append({"job": i, "shard": shard, "rows": 0, "error": refusal})
                continue
            try:
                summary = self.encode_shard(i, shard)
                fit = summary.get("fit") or {}
                done.append({"job": i, "shard": shard, "rows": summary["rows"] + summary["rejected"], "error": None,
                             "explained_variance": fit.get("explained_variance"), "l0": fit.get("l0")})  # fmt: skip
            except StorageError as err:  # the driver raises it: Ray Data would only pass on its traceback
                done.append({"job": i, "shard": shard, "rows": 0, "error": str(err)})
        return pa.Table.from_pylist(done, schema=SHARD_RESULT)

    def fit_check(self, texts: list[str]) -> dict | None:
        """The SAE's fit on this actor's first FIT_SAMPLES samples; None after the first shard."""
        if self.measured:
            return None
        self.measured = True
        try:
            return self.encoder.fit(texts[:FIT_SAMPLES])
        except Exception as err:  # a sample the model cannot take: the fit is measured on the next actor's
            log.warning("encode: fit check skipped: %s: %s", type(err).__name__, err)
            return None

    def encode_shard(self, job: int, shard: str) -> dict:
        storage, fs = self.storages[job], self.storages[job].fs
        start = time.time()
        rows = storage.retrying(
            f"reading prepared/{shard}",
            lambda: pq.read_table(
                storage.path(paths.PREPARED, shard), columns=["id", "text", *REJECT_FIELDS], filesystem=fs
            ),
        )
        fit = self.fit_check(rows["text"].to_pylist())
        spans = TopSpans()
        # within the shard too: on a CPU one shard can take minutes; a line every 15 s reaches the driver
        progress = Progress(f"encode {shard}", 0, rows.num_rows, every=15.0, bar=False)
        features, errors = self.encoder.encode_isolated(
            rows["id"].to_pylist(), rows["text"].to_pylist(), spans, progress.add
        )
        n_tokens = int(pc.sum(features["n_tokens"]).as_py() or 0)
        dense = DENSE in features.column_names
        summary = {
            "shard": shard,
            "rows": features.num_rows,
            "rejected": len(errors),
            "tokens": n_tokens,
            "seconds": round(time.time() - start, 3),
            # where and how it ran, for the record: the node, the actor (one model load) and the dtype
            "node": ray.get_runtime_context().get_node_id(),
            "actor": ray.get_runtime_context().get_actor_id(),
            "dtype": self.dtype,
            "parts": self.jobs[job].parts,
        } | ({"fit": fit} if fit else {})

        def write() -> dict:
            fs.create_dir(storage.path(paths.FEATURES), recursive=True)
            pq.write_table(features.drop_columns([DENSE]) if dense else features, storage.path(paths.FEATURES, shard),
                           filesystem=fs)  # fmt: skip
            if dense:
                fs.create_dir(storage.path(paths.DENSE), recursive=True)
                pq.write_table(features.select(["id", DENSE]), storage.path(paths.DENSE, shard), filesystem=fs)
            fs.create_dir(storage.path(paths.SPAN_CANDIDATES), recursive=True)
            pq.write_table(spans.table(), storage.path(paths.SPAN_CANDIDATES, shard), filesystem=fs)
            write_encode_rejects(storage, shard, rows, errors)
            return summary

        storage.retrying(
            f"writing features/{shard}",
            lambda: commit(storage, paths.shard_marker(shard), self.jobs[job].key, write),
        )
        log.info(
            "encode: %s: %d samples in %.1fs (%.0f samples/s)",
            shard,
            summary["rows"],
            summary["seconds"],
            summary["rows"] / max(summary["seconds"], 1e-9),
        )
        if errors:
            log.warning("encode: %s: %d sample(s) rejected as encode_error, first: %s", shard, len(errors),
                        next(iter(errors.values())))  # fmt: skip
        return summary


REJECT_FIELDS = ["source", "row", "record"]


def differing(marker: dict, parts: dict[str, str]) -> list[str]:
    """Which parts of a shard marker's fingerprint are not this run's (a marker of an older raysel
    does not say)."""
    return [k for k, v in parts.items() if marker.get("parts", {}).get(k) != v] or ["unrecorded part"]


def mean_fit(fits: list[dict]) -> dict | None:
    """The fit checks of the actors' first shards, token-weighted."""
    tokens = sum(f["tokens"] for f in fits if f.get("explained_variance") is not None)
    if not tokens:
        return None
    weighted = {k: sum(f[k] * f["tokens"] for f in fits if f.get("explained_variance") is not None) / tokens
                for k in ("explained_variance", "l0")}  # fmt: skip
    return {k: round(v, 4) for k, v in weighted.items()} | {"tokens": tokens, "shards_measured": len(fits)}


def write_encode_rejects(storage: Storage, shard: str, rows: pa.Table, errors: dict[str, str]) -> None:
    """The shard's samples the encoder could not take, as rejects with the reason encode_error."""
    rel = paths.encode_rejects(shard)
    storage.remove(rel)  # a re-encoded shard must not keep an earlier attempt's rejects
    if not errors:
        return
    failed = rows.filter(pc.is_in(rows["id"], pa.array(list(errors), pa.string()))).to_pylist()
    lines = [
        json.dumps(
            {
                "source": r["source"],
                "row": r["row"],
                "reason": "encode_error",
                "detail": errors[r["id"]],
                "raw": r["record"],
            },
            ensure_ascii=False,
        )
        for r in failed
    ]
    storage.fs.create_dir(storage.path(paths.REJECTS), recursive=True)
    with storage.fs.open_output_stream(storage.path(rel)) as f:
        f.write("".join(line + "\n" for line in lines).encode())


def encode_jobs(stack: ModelStack, jobs: list[EncodeJob], judge_fit: Callable[[float, float], None]) -> None:
    """The shards left in `jobs` through one actor pool. Each pool loads the model and SAE on every
    actor (minutes for a large model on a GPU cluster), so stores of the same model that are due
    together (a run's side sets) are encoded in one pass."""
    todo = [{"job": i, "shard": shard} for i, job in enumerate(jobs) for shard in job.todo]
    resources = model_resources(stack.encode, min(stack.encode.actors, len(todo)))
    items = ray.data.from_items(todo, override_num_blocks=len(todo))
    progress = Progress("encode", len(todo), sum(job.rows for job in jobs))
    results = map_stage(items, EncodeShards, resources, stack=stack, jobs=jobs)
    # one row per shard, as each finishes; both closed on the way out, which ends the pool's work
    with contextlib.closing(iter(results.iter_rows())) as rows, contextlib.closing(progress):
        for r in rows:
            progress.update(r["rows"])
            if r["error"]:
                # A shard fails only as a whole run would: storage down past s3.outage_seconds, or an
                # actor of another dtype. Going on would wait out the window once per shard left (at
                # 120 s, hours for a large store), so the run stops at the first.
                raise StorageError(
                    f"encode: stopped at a shard that could not be encoded or written: {r['error']}. The "
                    f"shards finished are committed, and a re-run encodes only the rest"
                )
            if r["explained_variance"] is not None:
                judge_fit(r["explained_variance"], r["l0"])


class Encode(Stage):
    """Every prepared shard through the encoders. Its key is the fingerprint of the prepared store, the
    model, the SAE and the encode settings; shards already committed under it are skipped."""

    name = "encode"
    needs = ("prepare",)
    brief = ("n_encoded", "n_encode_rejected", "n_shards")

    def __init__(
        self,
        stack: ModelStack,
        storage: Storage,
        force: bool = False,
        riders: Callable[[], list[EncodeJob]] | None = None,
    ):
        """`riders()`: other stores of this model (the run's side sets) with shards left, encoded in the
        same pass when this store has shards to encode: a pass loads the model on every actor."""
        self.stack, self.storage, self.force, self.riders = stack, storage, force, riders

    @functools.cached_property
    def meta(self) -> dict:
        """The SAE's metadata, checked against the model (read when the stage's turn comes: a default
        SAE is trained by then)."""
        meta = sae_metadata(self.stack)
        check_against_model(self.stack, meta)
        return meta

    @functools.cached_property
    def weights(self) -> str:
        """The SAE weights' digest, read once a stage: key() and run() both need it, and hashing a
        131k-latent SAE takes seconds."""
        return weights_digest(self.stack)

    def parts(self, prepared: dict) -> dict[str, str]:
        """What the features depend on, by the name a refusal gives it: the prepared store, the model,
        the dtype and device the config asks for (resolved on the actors, which record what they ran
        in), the SAE's weights themselves (one retrained in place under the same path is not mixed
        with the old), and the settings that change what is pooled."""
        stack = self.stack
        return {
            "input": prepared["fingerprint"],
            "model": stack.model.name,
            "dtype": f"{stack.model.dtype} on {stack.encode.runs_on()}",
            "sae": fingerprint([], self.weights, self.meta),
            "settings": fingerprint([], stack.prepare.max_tokens, stack.prepare.chat_template,
                                    stack.encode.skip_prefix and SKIPPED, stack.encode.top_m, FEATURE_SCHEMA.to_string(),
                                    CANDIDATE_SCHEMA.to_string(), TOP, WINDOW),
        }  # fmt: skip

    def fingerprint(self, prepared: dict) -> str:
        return fingerprint([], *self.parts(prepared).values())

    def key(self, done: Done) -> dict:
        # the stages that read the features key on this, so a new input, model, SAE or dtype redoes them;
        # a crash leaves no marker, and the shard markers then say what is left to do
        return {"fingerprint": self.fingerprint(done["prepare"])}

    def resources(self) -> Resources:
        return model_resources(self.stack.encode, self.stack.encode.actors)

    def refuse_or_clear(self, stale: dict[str, dict], parts: dict[str, str]) -> None:
        """Features of another input or config are GPU-hours: removed only with --force."""
        differ = differing(next(iter(stale.values())), parts)
        if not self.force:
            raise ConfigError(
                f"encode: {self.storage.uri(paths.FEATURES)} holds {len(stale)} shard(s) encoded under another "
                f"{', '.join(differ)} than this run's; nothing was removed. Set output.root to a new folder "
                f"to keep both, or pass --force to re-encode here"
            )
        log.warning("encode: --force: removing %d shard(s) of another %s; re-encoding", len(stale), ", ".join(differ))
        self.storage.remove(paths.FEATURES)
        for info in self.storage.listing(paths.REJECTS):
            if posixpath.basename(info.path).startswith("encode-"):
                self.storage.fs.delete_file(info.path)

    def judge_fit(self, ev: float, l0: float) -> None:
        """Stop a run whose SAE does not fit the model where it reads, before it spends hours."""
        where = f"layer {self.meta['layer']} of {self.stack.model.name!r}"
        if ev < 0 and not self.stack.sae.allow_poor_fit:
            raise ConfigError(
                f"sae: explained variance {ev:.3f} (L0 {l0:.1f}) at {where} on the first samples: the SAE "
                f"reconstructs these activations worse than their mean does. A wrong layer or hook, an SAE of "
                f"another model, or a double BOS? Set sae.allow_poor_fit: true to encode anyway"
            )
        if ev < POOR_FIT:
            log.warning("encode: the SAE explains only %.3f of the variance at %s (L0 %.1f)", ev, where, l0)

    def job(self, done: Done) -> EncodeJob:
        """What is left to encode of this store; shards committed under another fingerprint are refused,
        or removed with --force."""
        storage, store, prepared = self.storage, FeatureStore(self.storage), done["prepare"]
        parts = self.parts(prepared)
        key = {"fingerprint": self.fingerprint(prepared)}
        shards = sorted(
            posixpath.basename(i.path) for i in storage.listing(paths.PREPARED) if i.path.endswith(".parquet")
        )
        markers = store.done_shards()
        finished = {name: m for name, m in markers.items() if m.get("key") == key}
        if len(finished) < len(markers):
            self.refuse_or_clear({n: m for n, m in markers.items() if n not in finished}, parts)
            finished = {}
        todo = [s for s in shards if s not in finished]
        log.info("encode: %s: %d shard(s), %d already done, %d to encode (layer %s, SAE %s)", storage.uri(),
                 len(shards), len(finished), len(todo), self.meta["layer"], self.meta["identity"])  # fmt: skip
        encoded = sum(m["rows"] + m.get("rejected", 0) for m in finished.values())
        dtypes = {m.get("dtype") for m in finished.values()} - {None}
        # auto resolves on each actor: the first shards set the store's dtype
        pinned = next(iter(dtypes), None)
        return EncodeJob(storage.root, key, parts, pinned, tuple(shards), tuple(todo), prepared["n_valid"] - encoded)

    def run(self, done: Done) -> dict:
        store, job = FeatureStore(self.storage), self.job(done)
        fingerprint, shards, todo = job.key["fingerprint"], job.shards, job.todo
        start = time.time()
        if todo:
            riders = self.riders() if self.riders else []
            if riders:
                log.info("encode: with %d shard(s) of the run's side sets (%s) in the same pass",
                         sum(len(r.todo) for r in riders), ", ".join(posixpath.basename(r.root) for r in riders))  # fmt: skip
            encode_jobs(self.stack, [job, *riders], self.judge_fit)
        markers = store.done_shards()
        missing = [s for s in shards if s not in markers]
        if missing:
            raise RuntimeError(f"encode: shards {missing[:5]} have no completion marker; re-run to finish them")
        seconds = time.time() - start
        encoded_now = sum(markers[s]["rows"] for s in todo)
        log.info(
            "encode: %d samples encoded now in %.1fs (%.1f samples/s); %d in the store",
            encoded_now,
            seconds,
            encoded_now / max(seconds, 1e-9),
            sum(markers[s]["rows"] for s in shards),
        )
        dtypes = sorted({markers[s].get("dtype") or "unrecorded" for s in shards})
        if len(dtypes) > 1:  # actors of two CPU kinds started together on a fresh store
            raise ConfigError(f"encode: the store's shards were encoded in {' and '.join(dtypes)}; set model.dtype "
                              f"to one of them and re-run with --force")  # fmt: skip
        return {
            "fingerprint": fingerprint,
            "dtype": dtypes[0],
            "layer": self.meta["layer"],
            "sae": self.meta["identity"],
            "d_sae": self.meta.get("d_sae"),
            "n_shards": len(shards),
            "n_shards_encoded": len(todo),
            "n_shards_skipped": len(shards) - len(todo),
            "n_encoded": sum(markers[s]["rows"] for s in shards),
            "n_encode_rejected": sum(markers[s].get("rejected", 0) for s in shards),
            "fit": mean_fit([markers[s]["fit"] for s in shards if markers[s].get("fit")]),
            "n_tokens": sum(markers[s]["tokens"] for s in shards),
        }
