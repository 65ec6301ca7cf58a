"""Finding and reading corpus files, row by row, without losing any.

Ray Data's own JSON and parquet readers stop at the first malformed line and
give no line numbers, so raysel reads through a FileBasedDatasource of its own:
every row, good or bad, comes out with its source file, its 1-based row number
and its raw JSON text. Rows that cannot even be decoded leave with a reason;
parsing and validation happen in the prepare stage."""

from __future__ import annotations

import base64
import codecs
import csv
import hashlib
import io
import itertools
import json
import math
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.utils import glob_translate
from pydantic import Field, field_validator

from raysel.core.records import FieldMap
from raysel.core.section import Section
from raysel.core.storage import S3Config, filesystem_for


class InputConfig(Section):
    paths: list[str] = Field(default_factory=list)
    """files, directories, globs or URIs (`s3://`, `gs://`, `abfs://`, `hf://`, any fsspec scheme; see Locations); one
    string or a list, all on one filesystem"""
    hf_dataset: str | None = None
    """instead of paths: a Hub dataset id (or a local dataset folder); `datasets` resolves the split's data files, and
    every worker reads them itself as `hf://` URIs"""
    hf_split: str = "train"
    """the split of `input.hf_dataset`"""
    hf_config: str | None = None
    """a multi-config dataset's config (its subset), as `load_dataset`'s `name`; without it such a dataset is refused,
    naming its configs"""
    hf_revision: str | None = None
    """a branch, tag or commit of the dataset repo; `null`: its default branch"""
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "hf_disk"] = "auto"
    """`auto` (by extension), `jsonl`, `json`, `csv`, `parquet`, `hf_disk`"""
    shape: Literal["auto", "alpaca", "messages", "sharegpt", "text"] = "auto"
    """`auto` (per row), `alpaca`, `messages`, `sharegpt`, `text`"""
    fields: FieldMap = FieldMap()

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, v):
        return [v] if isinstance(v, str) else v


RAW_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),  # line number for JSON lines, record number otherwise; 0: the whole file
        ("order", pa.int64()),  # (file index << ORDER_BITS) | row: the row's place in the whole input
        ("raw", pa.string()),  # the row's JSON text (bytes that are not UTF-8 shown as \x escapes)
        ("reason", pa.string()),  # a reject reason code, or null
        ("detail", pa.string()),
    ]
)

EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".json": "json",
    ".json.gz": "json",
    ".json.zst": "json",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".csv.zst": "csv",
    ".parquet": "parquet",
    ".arrow": "hf_disk",
}
ROWS_PER_BLOCK = 8192
BOM = b"\xef\xbb\xbf"
LINE_END = re.compile(rb"\r\n|\r|\n")
BLANK_LINE = "blank_line"  # not a reject: blank lines are counted apart
PREVIEW_BYTES = 4096  # of a row too large to keep, the head shown in its reject
ORDER_BITS = 40  # rows per file < 2**40
CHUNK_BYTES = 1 << 22


class InputError(ValueError):
    """The configured input cannot be read; raised before any work starts."""


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str
    size: int
    mtime: str


def list_input_files(cfg: InputConfig, s3: S3Config) -> tuple[pafs.FileSystem, list[InputFile]]:
    """Expand input.paths (files, directories, globs) or input.hf_dataset into files."""
    entries = hub_dataset_files(cfg) if cfg.hf_dataset else cfg.paths
    if cfg.hf_dataset and not entries:  # a dataset with no data files (a loading script): its local cache
        return pafs.LocalFileSystem(), _hub_dataset_cache_files(cfg)
    found: dict[str, InputFile] = {}
    filesystems = set()
    fs = None
    for entry in entries:
        fs, path = filesystem_for(entry, s3)
        filesystems.add(entry.split("://", 1)[0] if "://" in entry else "local")
        try:
            infos = _expand(fs, path, entry)
        except OSError as err:  # pyarrow's message names the path and the S3 error, never the keys
            raise InputError(f"input.paths: cannot list {entry!r}: {err}") from None
        if not infos:
            raise InputError(f"input.paths: nothing matches {entry!r}")
        for info, fmt in infos:
            fmt = cfg.format if cfg.format != "auto" else fmt
            found[info.path] = InputFile(info.path, fmt, info.size or 0, str(info.mtime_ns or info.mtime))
    if len(filesystems) > 1:
        raise InputError(
            f"input.paths: paths on {len(filesystems)} filesystems ({', '.join(sorted(filesystems))}); put one kind in a run"
        )
    return fs, [found[p] for p in sorted(found)]


def fingerprint(files: list[InputFile], *parts) -> str:
    """Changes when any input file or any of `parts` (config sections) changes."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.path}\0{f.size}\0{f.mtime}\0{f.format}\n".encode())
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def content_fingerprint(paths: list[str], s3: S3Config) -> str:
    """Changes when the bytes of any file under `paths` change, whatever its size and time say, and
    only then: for side inputs (targets, an anchor, a reference), small sets a user edits in place,
    copies or reaches through another path (a package installed elsewhere)."""

    fs, files = list_input_files(InputConfig(paths=paths), s3)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.size}\0{f.format}\0".encode())
        with fs.open_input_stream(f.path) as stream:
            while chunk := stream.read(CHUNK_BYTES):
                h.update(chunk)
    return h.hexdigest()[:16]


def _expand(fs: pafs.FileSystem, path: str, entry: str) -> list[tuple[pafs.FileInfo, str]]:
    if any(c in path for c in "*?["):
        # fsspec's meaning, as datasets and the anchors read globs: `*` stays within a folder, `**` recurses
        base = path[: min(path.index(c) for c in "*?[" if c in path)].rpartition("/")[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        pattern = re.compile(glob_translate(path))
        return _typed([i for i in infos if i.is_file and pattern.fullmatch(i.path)], entry)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input.paths: {entry!r} does not exist")
    if info.type == pafs.FileType.File:
        return _typed([info], entry)
    if fs.get_file_info(posixpath.join(path, "dataset_dict.json")).is_file:
        raise InputError(f"input.paths: {entry!r} is a DatasetDict; point at one split's directory")
    state = posixpath.join(path, "state.json")
    if fs.get_file_info(state).is_file:  # an HF dataset saved with save_to_disk
        with fs.open_input_stream(state) as f:
            names = [d["filename"] for d in json.loads(f.read())["_data_files"]]
        return [(fs.get_file_info(posixpath.join(path, n)), "hf_disk") for n in names]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return _typed([i for i in infos if i.is_file and _format_of(i.path)], entry)


def _typed(infos: list[pafs.FileInfo], entry: str) -> list[tuple[pafs.FileInfo, str]]:
    for info in infos:
        if not _format_of(info.path):
            raise InputError(
                f"input.paths: cannot tell the format of {info.path!r} from {entry!r}; "
                f"set input.format (allowed: jsonl, json, csv, parquet, hf_disk)"
            )
    return [(i, _format_of(i.path)) for i in infos]


def _format_of(path: str) -> str | None:
    name = path.lower()
    return next((fmt for ext, fmt in EXTENSIONS.items() if name.endswith(ext)), None)


def hub_dataset_files(cfg: InputConfig) -> list[str]:
    """The data files of input.hf_dataset's split as `datasets` resolves them, without downloading them:
    hf:// URIs for a Hub dataset, which every worker then reads itself; paths for a local folder."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(cfg.hf_dataset, name=cfg.hf_config, revision=cfg.hf_revision)
    except ValueError as err:  # a multi-config dataset without a config, or a config it does not have
        message = " ".join(str(err).split("Example of usage")[0].split())
        raise InputError(f"input.hf_config: {cfg.hf_dataset!r}: {message}") from None
    data_files = builder.config.data_files or {}
    split = next((files for name, files in data_files.items() if str(name) == cfg.hf_split), None)
    if split is None and data_files:
        raise InputError(f"input.hf_split: {cfg.hf_dataset!r} has no split {cfg.hf_split!r} "
                         f"(it has: {', '.join(sorted(map(str, data_files)))})")  # fmt: skip
    return list(split or [])


def _hub_dataset_cache_files(cfg: InputConfig) -> list[InputFile]:
    import datasets

    ds = datasets.load_dataset(cfg.hf_dataset, name=cfg.hf_config, revision=cfg.hf_revision, split=cfg.hf_split)
    return [InputFile(c["filename"], "hf_disk", 0, "") for c in ds.cache_files]


def read_rows(f: pa.NativeFile, fmt: str, limit: int) -> Iterator[dict]:
    """Every row of one file as {row, raw, reason, detail}; never raises for a row's content."""
    if fmt == "parquet":
        return _table_rows(pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BLOCK), limit)
    if fmt == "hf_disk":
        return _table_rows(pa.ipc.open_stream(f), limit)
    if fmt == "csv":
        return _csv_rows(f, limit)
    return _json_rows(f, limit, array_ok=fmt == "json")


def _json_rows(f: pa.NativeFile, limit: int, array_ok: bool) -> Iterator[dict]:
    head = _head(f)
    if array_ok and head.lstrip().startswith(b"["):
        yield from _json_array_rows(_Streamed(head, f), limit)
        return
    for number, line, size in _lines(head, f, limit):
        if line.startswith(BOM):  # files joined with cat keep each one's BOM
            line = line[len(BOM) :]
        if size > limit:
            yield _too_large(number, line, size, limit)
        elif not line.strip():  # counted, never a sample
            yield _row(number, "", BLANK_LINE)
        else:
            yield _decoded(number, line)


def _head(f: pa.NativeFile) -> bytes:
    """The first read, without a BOM, grown until it holds a byte that is not white space (or the file
    ends, or 64 KiB of white space were read): a short read must not split the BOM, nor hide a JSON
    array's opening bracket."""
    head = f.read(CHUNK_BYTES)
    while len(head) < len(BOM) or (not head.removeprefix(BOM).strip() and len(head) < 1 << 16):
        more = f.read(CHUNK_BYTES)
        if not more:
            break
        head += more
    return head.removeprefix(BOM)


def _lines(head: bytes, f: pa.NativeFile, limit: int) -> Iterator[tuple[int, bytes, int]]:
    """(number, line, its full size) for each physical line, ended by LF, CRLF or a lone CR. Of a line
    over `limit` bytes only the first PREVIEW_BYTES are kept."""
    number, tail, dropped = 0, b"", 0
    for chunk in itertools.chain([head], iter(lambda: f.read(CHUNK_BYTES), b"")):
        data, start = tail + chunk, 0
        for end in LINE_END.finditer(data):
            if end.group() == b"\r" and end.end() == len(data):
                break  # perhaps the first half of a CRLF split across chunks
            number += 1
            yield number, data[start : end.start()], dropped + end.start() - start
            start, dropped = end.end(), 0
        tail = data[start:]
        if (dropped or len(tail) > limit) and not tail.endswith(b"\r"):
            dropped += max(0, len(tail) - PREVIEW_BYTES)
            tail = tail[:PREVIEW_BYTES]
    if tail or dropped:  # the last line, without an end or with a lone CR held back above
        line = tail.removesuffix(b"\r")
        yield number + 1, line, dropped + len(line)


def _decoded(number: int, line: bytes) -> dict:
    try:
        return _row(number, line.decode("utf-8"))
    except UnicodeDecodeError as err:
        return _row(number, line.decode("utf-8", "backslashreplace"), "invalid_utf8", str(err))


def _too_large(number: int, head: bytes, size: int, limit: int) -> dict:
    shown = head[:PREVIEW_BYTES].decode("utf-8", "backslashreplace")
    return _row(number, shown, "too_large", f"{size:,} bytes, over prepare.max_row_bytes ({limit:,}); raw: the head")


def _json_array_rows(src: _Streamed, limit: int) -> Iterator[dict]:
    """One row per element of a JSON array, its raw text as written (line ends made spaces, which
    JSON allows between tokens and never inside a string), read a chunk at a time: the text held is
    the element being read and the chunk it is in. An element with bytes that are not UTF-8 is
    rejected alone; from where the array stops parsing, the rest of the file is one reject."""
    number, pos = 0, src.text.index("[") + 1
    while True:
        pos = src.skip(pos)
        if pos >= len(src.text):  # a cut-off file: say so, whatever came before it
            yield _row(number + 1, "", "malformed_json", "the array has no closing ']'")
            return
        if src.text[pos] == "]":
            return
        number += 1
        end, err = src.value_end(pos)
        if err is not None:
            yield _row(number, src.text[pos : pos + PREVIEW_BYTES], "malformed_json", f"the array stops parsing: {err}")
            return
        raw = src.text[pos:end].encode("utf-8", "surrogateescape")
        if len(raw) > limit:
            yield _too_large(number, raw, len(raw), limit)
        else:
            yield _decoded(number, raw.replace(b"\r", b" ").replace(b"\n", b" "))
        pos = src.skip(end)
        if pos < len(src.text) and src.text[pos] not in ",]":
            yield _row(number + 1, src.text[pos : pos + PREVIEW_BYTES], "malformed_json", "expected ',' or ']'")
            return
        pos = src.forget(pos + (src.text[pos : pos + 1] == ","))


class _Streamed:
    """A file's text, decoded as it is read: `text` holds what is read and not yet forgotten. A value
    cut by a read is scanned again after the next, which reads at least as much as is pending, so a
    long value costs linear time. Bytes that are not UTF-8 decode to lone surrogates (which no UTF-8
    text holds), so that they cost their own element only."""

    def __init__(self, head: bytes, f: pa.NativeFile):
        self.f, self.decoder, self.eof = f, codecs.getincrementaldecoder("utf-8")("surrogateescape"), False
        self.text = self.decoder.decode(head)

    def more(self, pending: int) -> None:
        data = self.f.read(max(CHUNK_BYTES, pending))
        self.eof = not data
        self.text += self.decoder.decode(data, final=self.eof)

    def skip(self, pos: int) -> int:
        """The first position at or after `pos` that is not white space (len(text) at the end)."""
        while (pos := _after_ws(self.text, pos)) >= len(self.text) and not self.eof:
            self.more(0)
        return pos

    def value_end(self, pos: int) -> tuple[int | None, json.JSONDecodeError | None]:
        """Where the value at `pos` ends, or why it does not parse (only said once the file has ended:
        before that, the value may go on in the next read, a number included)."""
        while True:
            try:
                end = _value_end(self.text, pos)
                # a number ends where a delimiter follows: "0" of "0.5" cut after "0." parses alone
                if self.eof or (end < len(self.text) and (self.text[pos] not in _NUMBER or self.text[end] in _AFTER)):
                    return end, None
            except json.JSONDecodeError as err:
                if self.eof:
                    return None, err
            self.more(len(self.text) - pos)

    def forget(self, pos: int) -> int:
        """Drop the text before `pos` once a chunk of it is read; the new position of `pos`."""
        if pos < CHUNK_BYTES:
            return pos
        self.text = self.text[pos:]
        return 0


# Scanning only: numbers stay text, so an element's value is parsed once, per row, in prepare.
_SCANNER = json.JSONDecoder(parse_int=str, parse_float=str, parse_constant=str)
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_WS = re.compile(r"[ \t\n\r]*")
_NUMBER, _AFTER = set("-0123456789"), set(" \t\n\r,]}")


def _after_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def _value_end(text: str, pos: int) -> int:
    """Where the JSON value at `pos` ends. One nested beyond what the parser's recursion allows is
    skipped by its brackets, and left for prepare to reject as too deep."""
    try:
        return _SCANNER.raw_decode(text, pos)[1]
    except RecursionError:
        depth = 0
        for token in _STRING_OR_BRACKET.finditer(text, pos):
            depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(token.group(), 0)
            if depth == 0:
                return token.end()
        raise json.JSONDecodeError("unbalanced brackets", text, pos) from None


def _table_rows(batches, limit: int) -> Iterator[dict]:
    number = 0
    for batch in batches:
        for record in batch.to_pylist():
            number += 1
            raw = table_record_json(record)
            size = len(raw.encode())
            yield _too_large(number, raw.encode(), size, limit) if size > limit else _row(number, raw)


def _csv_rows(f: pa.NativeFile, limit: int) -> Iterator[dict]:
    """A CSV file with a header row: every value read as the text it was written (`007` stays `007`,
    and a column of numbers is no int column that a text field would refuse)."""
    head = f.read(1 << 20)  # the header row is in it; the reader then reads it again, then the rest
    names = next(csv.reader(io.StringIO(head.decode("utf-8", "replace").removeprefix("\ufeff"))), [])
    strings = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False)
    return _table_rows(pacsv.open_csv(io.BufferedReader(_Rejoined(head, f)), convert_options=strings), limit)


class _Rejoined(io.RawIOBase):
    """The bytes already read from a stream, then the rest of it."""

    def __init__(self, head: bytes, rest: pa.NativeFile):
        self.head, self.rest = memoryview(head), rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.head[: len(buffer)] if self.head else self.rest.read(len(buffer))
        self.head = self.head[len(data) :]
        buffer[: len(data)] = data
        return len(data)


def table_record_json(record: dict) -> str:
    """A parquet or arrow row as JSON. JSON has no bytes, NaN or infinity: binary values become base64
    text, non-finite floats null; dates, times and decimals their ISO or decimal text."""
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False, default=_json_default)
    except ValueError:  # a NaN or an infinity somewhere in the row
        return json.dumps(_finite(record), ensure_ascii=False, default=_json_default)


def _json_default(value) -> str:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _row(number: int, raw: str, reason: str | None = None, detail: str | None = None) -> dict:
    return {"row": number, "raw": raw, "reason": reason, "detail": detail}
