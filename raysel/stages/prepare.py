"""The prepare stage: corpus files in, validated and rendered samples out.

Every input row lands either in `prepared/` (parquet, one row per sample) or
in `rejects/` (JSON lines, with its source, row number, raw text and reason).
Its resume key is the input's fingerprint (files, sizes, times, the input and
prepare sections, the model): a re-run with the same inputs and config skips it."""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
from ray.data import Dataset, SaveMode
from ray.data.datasource import FilenameProvider
from ray.data.expressions import col

from raysel.config import InputConfig, ModelConfig, PrepareConfig, S3Config
from raysel.core import paths
from raysel.core.corpus import (
    BLANK_LINE,
    ORDER_BITS,
    content_fingerprint,
    fingerprint,
    list_input_files,
)
from raysel.core.datasource import CorpusDatasource
from raysel.core.models import load_tokenizer, model_source, tokenize
from raysel.core.ray_adapter import Resources, map_stage
from raysel.core.records import MESSAGES, Rejected, chat_template_for, normalize, parse_record, render
from raysel.core.section import ConfigError
from raysel.core.storage import Storage
from raysel.stages.base import Done, Stage

log = logging.getLogger(__name__)

# The prepared store: what the encoder and every later stage read.
PREPARED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # the configured id column, or a hash of the content
        ("shape", pa.string()),  # alpaca | messages | text: the input record's shape
        ("messages", MESSAGES),  # the normalised turns; null for plain text
        ("text", pa.string()),  # rendered through the chat template, cut to max_tokens
        ("n_tokens", pa.int32()),  # tokens in `text`
        ("n_tokens_full", pa.int32()),  # tokens before truncation
        ("truncated", pa.bool_()),
        ("n_response_tokens", pa.int32()),  # tokens of the last assistant turn; 0 for plain text
        ("content_hash", pa.string()),
        ("source", pa.string()),  # input file
        ("row", pa.int64()),  # row or line number in that file
        ("record", pa.string()),  # the original record as JSON, for writing selections back
    ]
)
REJECT_COLUMNS = ["source", "row", "reason", "detail", "raw"]
SAMPLE_SCHEMA = pa.schema(
    list(PREPARED_SCHEMA)
    + [pa.field(n, t) for n, t in (("order", pa.int64()), ("reason", pa.string()), ("detail", pa.string()))]
)

MARKS = pa.schema([("order", pa.int64()), ("reason", pa.string()), ("detail", pa.string())])  # rows found repeated


class Formatter:
    """Stage: raw rows to samples: parse, normalise, render, count and cut tokens."""

    def __init__(self, input: InputConfig, prepare: PrepareConfig, model: ModelConfig):
        self.input, self.max_tokens = input, prepare.max_tokens
        self.tokenizer = load_tokenizer(model)
        self.template = chat_template_for(self.tokenizer, prepare.chat_template)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._guarded(self._sample, r, "preparing") for r in batch.to_pylist()]
        return _table(self._tokenized(rows))

    def _tokenized(self, rows: list[dict]) -> list[dict]:
        """The rows with their token counts; a valid row the tokenizer refuses becomes an internal_error."""
        valid = [r for r in rows if r["reason"] is None]
        try:
            self._cut_to_max_tokens(valid)
            return rows
        except Exception:  # one row the tokenizer refuses: find it, and keep the others

            def alone(row: dict) -> dict:
                self._cut_to_max_tokens([row])
                return row

            return [self._guarded(alone, r, "tokenizing") if r["reason"] is None else r for r in rows]

    @staticmethod
    def _guarded(step, row: dict, doing: str) -> dict:
        """`step(row)`, or the row as an internal_error: no row stops the batch."""
        try:
            return step(row)
        except Exception as err:
            return _internal_error(row, f"{doing}: {type(err).__name__}: {err}")

    def _sample(self, row: dict) -> dict:
        out = {"source": row["source"], "row": row["row"], "order": row["order"], "record": row["raw"]}
        if row["reason"]:
            return {**out, "reason": row["reason"], "detail": row["detail"]}
        try:
            sample = normalize(parse_record(row["raw"]), self.input.fields, self.input.shape)
            text = render(sample, self.tokenizer, self.template)
        except Rejected as rej:
            return {**out, "reason": rej.reason, "detail": rej.detail}
        return {
            **out,
            "id": sample.id,
            "shape": sample.shape,
            "messages": sample.messages,
            "text": text,
            "content_hash": sample.content_hash,
            "reason": None,
        }

    def _cut_to_max_tokens(self, rows: list[dict]) -> None:
        if not rows:
            return
        limit = self.max_tokens
        enc = tokenize(self.tokenizer, [r["text"] for r in rows], return_offsets_mapping=True)
        responses = [
            next((m["content"] for m in reversed(r["messages"] or []) if m["role"] == "assistant"), "") for r in rows
        ]
        for r, ids in zip(rows, self.tokenizer(responses, add_special_tokens=False)["input_ids"]):
            r["n_response_tokens"] = len(ids)
        for r, ids, offsets in zip(rows, enc["input_ids"], enc["offset_mapping"]):
            r["n_tokens_full"] = len(ids)
            r["truncated"] = len(ids) > limit
            r["n_tokens"] = min(len(ids), limit)
            if r["truncated"]:
                r["text"] = r["text"][: offsets[limit - 1][1]]


def _internal_error(row: dict, detail: str) -> dict:
    keep = ("source", "row", "order", "record")
    return {**{k: row.get(k) for k in keep}, "reason": "internal_error", "detail": detail[:2000]}


def _table(rows: list[dict]) -> pa.Table:
    """The batch's rows in SAMPLE_SCHEMA; a row arrow cannot take becomes an internal_error."""
    try:
        return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    except Exception:
        tables = []
        for r in rows:
            try:
                tables.append(pa.Table.from_pylist([r], schema=SAMPLE_SCHEMA))
            except Exception as err:
                bad = _internal_error(r, f"writing: {type(err).__name__}: {err}")
                tables.append(pa.Table.from_pylist([bad], schema=SAMPLE_SCHEMA))
        return pa.concat_tables(tables)


class PartNames(FilenameProvider):
    """part-00000.<ext>: deterministic names, so a retried write overwrites."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}.{self.file_format}"


class Prepare(Stage):
    name = "prepare"
    brief = ("n_input", "n_blank_lines", "n_valid", "n_rejected", "rejected_by_reason")

    def __init__(
        self,
        input: InputConfig,
        prepare: PrepareConfig,
        model: ModelConfig,
        s3: S3Config,
        storage: Storage,
        by_content: bool = False,
    ):
        self.input, self.prepare, self.model, self.s3, self.storage = input, prepare, model, s3, storage
        self.by_content = by_content

    @functools.cached_property
    def listed(self) -> tuple[pafs.FileSystem, list]:
        """The input's filesystem and files; an unreadable input fails here, before any work."""
        return list_input_files(self.input, self.s3)

    @property
    def files(self) -> list:
        return self.listed[1]

    @functools.cached_property
    def fingerprint(self) -> str:
        # Files count by resolved path, size and time; a side set (small, edited in place, reached by
        # another path when the package moves) by its bytes alone. input.paths as written is left out: the same files named another way (relative, through a
        # symlink, a glob) are the same input. The output schema is part of it: a store written by
        # another version of this stage is redone.
        content = content_fingerprint(self.input.paths, self.s3) if self.by_content else None
        return fingerprint(
            [] if self.by_content else self.files,
            self.input.model_dump(mode="json", exclude={"paths"}),
            self.prepare.model_dump(mode="json"),
            self.model.name,
            PREPARED_SCHEMA.to_string(),
            content,
        )

    def key(self, done: Done) -> dict:
        return {"fingerprint": self.fingerprint}

    def resources(self) -> Resources:
        return Resources(batch_size=self.prepare.batch_size, memory=2 << 30)

    def run(self, done: Done) -> dict:
        model_source(self.model)  # fail here, not in every worker; converts the embedded model once
        storage, files = self.storage, self.files
        start = time.time()
        log.info("prepare: reading %d file(s) (%s)", len(files), ", ".join(sorted({f.format for f in files})))
        kept, rejects, n_input, n_blank = self.validate()
        kept.write_parquet(
            storage.path(paths.PREPARED),
            filesystem=storage.fs,
            mode=SaveMode.OVERWRITE,
            filename_provider=PartNames(file_format="parquet"),
            max_rows_per_file=self.prepare.rows_per_file,
        )
        rejects.write_json(
            storage.path(paths.REJECTS),
            filesystem=storage.fs,
            mode=SaveMode.OVERWRITE,
            filename_provider=PartNames(file_format="jsonl"),
            force_ascii=False,
        )
        by_reason = count_by(rejects, "reason")
        summary = {
            "fingerprint": self.fingerprint,
            "files": [f.path for f in files],
            "n_input": n_input,
            "n_blank_lines": n_blank,  # skipped; with n_input, every physical line of the JSON lines files
            "n_valid": kept.count(),
            "n_rejected": sum(by_reason.values()),
            "rejected_by_reason": by_reason,
            "n_truncated": kept.filter(expr=col("truncated")).count(),
        }
        assert summary["n_input"] == summary["n_valid"] + summary["n_rejected"], summary
        seconds = time.time() - start
        log.info(
            "prepare: %d rows in %.1fs (%.0f rows/s): %d valid, %d rejected %s, %d truncated",
            summary["n_input"],
            seconds,
            summary["n_input"] / max(seconds, 1e-9),
            summary["n_valid"],
            summary["n_rejected"],
            by_reason,
            summary["n_truncated"],
        )
        return summary

    def validate(self) -> tuple[Dataset, Dataset, int, int]:
        """Every input row, split into valid samples and rejects (both materialised), with the count of
        rows and of blank lines."""
        raw = ray.data.read_datasource(CorpusDatasource(self.files, self.listed[0], self.prepare.max_row_bytes))
        formatted = map_stage(
            raw, Formatter, self.resources(), input=self.input, prepare=self.prepare, model=self.model
        ).materialize()
        blank = col("reason") == BLANK_LINE
        n_blank = formatted.filter(expr=blank).count()
        samples = formatted.filter(expr=col("reason").is_null() | ~blank).materialize()
        n_input = samples.count()
        marks = repeats(samples, self.prepare.dedup, [f.path for f in self.files])
        if marks.num_rows:
            samples = samples.map_batches(
                _mark_repeats, batch_format="pyarrow", fn_kwargs={"marks": marks}
            ).materialize()
        kept = samples.filter(expr=col("reason").is_null()).select_columns(PREPARED_SCHEMA.names)
        rejects = samples.filter(expr=col("reason").is_not_null()).rename_columns({"record": "raw"})
        return kept, rejects.select_columns(REJECT_COLUMNS).materialize(), n_input, n_blank


def held_input(storage: Storage) -> list[str] | None:
    """The input files of the run a root holds, from its prepare marker; None for a root without one."""
    done = storage.read_json(paths.marker(Prepare.name))
    return None if done is None else sorted(done.get("files", []))


def check_root(storage: Storage, files: list[str], force: bool) -> None:
    """A root that holds a run of other input files is not overwritten unless forced: a second
    experiment must not silently replace the first."""
    held = held_input(storage)
    if held is not None and held != sorted(files) and not force:
        raise ConfigError(
            f"output.root: {storage.uri()} holds a run of other input files ({', '.join(held[:3])}"
            f"{', ...' if len(held) > 3 else ''}); set output.root to a new folder, or pass --force to replace it"
        )


def repeats(samples: Dataset, dedup: bool, files: list[str]) -> pa.Table:
    """(order, reason, detail) of every valid row whose text (with prepare.dedup) or, among the rows
    left, whose id an earlier row (by file, then row) already has. Only the keys and orders of the valid
    rows come to the driver (tens of bytes a row); one small table of repeats goes back to the workers."""
    columns = ["order", "id"] + ["content_hash"] * dedup
    valid = samples.filter(expr=col("reason").is_null()).select_columns(columns)
    schema = pa.schema([SAMPLE_SCHEMA.field(c) for c in columns])
    parts = [t.cast(schema) for t in valid.iter_batches(batch_format="pyarrow", batch_size=None)]
    table = pa.concat_tables([schema.empty_table(), *parts]).sort_by("order")
    marks, mask = [], (1 << ORDER_BITS) - 1
    # Each pass sees only the rows still valid, so a row dropped as a repeated text cannot make a
    # later row with its id a repeat.
    for key, reason in [("content_hash", "duplicate_text")] * dedup + [("id", "duplicate_id")]:
        codes = pc.dictionary_encode(table[key].combine_chunks()).indices.to_numpy()
        _, first = np.unique(codes, return_index=True)  # each key's earliest row
        earlier = first[codes]
        repeat = earlier != np.arange(table.num_rows)
        order = table["order"].to_numpy()
        details = [f"same {key} as {files[f >> ORDER_BITS]} row {f & mask}" for f in order[earlier[repeat]].tolist()]
        marks.append(
            pa.table({"order": order[repeat], "reason": [reason] * len(details), "detail": details}, schema=MARKS)
        )
        table = table.filter(pa.array(~repeat))
    return pa.concat_tables(marks).combine_chunks()


def _mark_repeats(batch: pa.Table, marks: pa.Table) -> pa.Table:
    batch = batch.combine_chunks()
    at = pc.index_in(batch["order"], value_set=marks["order"])
    if at.null_count == len(at):
        return batch
    for column in ("reason", "detail"):
        batch = batch.set_column(
            batch.schema.get_field_index(column), column, pc.coalesce(pc.take(marks[column], at), batch[column])
        )
    return batch


def count_by(ds: Dataset, column: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch in ds.select_columns([column]).iter_batches(batch_format="pyarrow", batch_size=65536):
        for item in batch[column].value_counts().to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return dict(sorted(counts.items()))
