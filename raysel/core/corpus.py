"""Finding and reading corpus files, row by row, without losing any.

Ray Data's own JSON and parquet readers stop at the first malformed line and
give no line numbers, so raysel reads through a FileBasedDatasource of its own:
every row, good or bad, comes out with its source file, its 1-based row number
and its raw JSON text. Rows that cannot even be decoded leave with a reason;
parsing and validation happen in the prepare stage."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from raysel.core.storage import filesystem_for

if TYPE_CHECKING:
    from raysel.config import InputConfig, S3Config

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
    ".json": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".arrow": "hf_disk",
}
ROWS_PER_BLOCK = 8192
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
    if cfg.hf_dataset:
        return pafs.LocalFileSystem(), _hub_dataset_files(cfg)
    found: dict[str, InputFile] = {}
    filesystems = set()
    fs = None
    for entry in cfg.paths:
        fs, path = filesystem_for(entry, s3)
        filesystems.add(entry.startswith("s3://"))
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
        raise InputError("input.paths: mix of local and s3:// paths; put one kind in a run")
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
    """Changes when the bytes of any file under `paths` change, whatever its size and time say: for
    side inputs (targets, an anchor), small sets a user edits in place."""
    from raysel.config import InputConfig

    fs, files = list_input_files(InputConfig(paths=paths), s3)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.path}\0".encode())
        with fs.open_input_stream(f.path) as stream:
            while chunk := stream.read(CHUNK_BYTES):
                h.update(chunk)
    return h.hexdigest()[:16]


def _expand(fs: pafs.FileSystem, path: str, entry: str) -> list[tuple[pafs.FileInfo, str]]:
    if any(c in path for c in "*?["):
        base = path[: min(path.index(c) for c in "*?[" if c in path)].rpartition("/")[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return _typed([i for i in infos if i.is_file and fnmatch.fnmatchcase(i.path, path)], entry)
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
                f"set input.format (allowed: jsonl, json, parquet, hf_disk)"
            )
    return [(i, _format_of(i.path)) for i in infos]


def _format_of(path: str) -> str | None:
    name = path.lower()
    return next((fmt for ext, fmt in EXTENSIONS.items() if name.endswith(ext)), None)


def _hub_dataset_files(cfg: InputConfig) -> list[InputFile]:
    import datasets

    ds = datasets.load_dataset(cfg.hf_dataset, split=cfg.hf_split)
    return [InputFile(c["filename"], "hf_disk", 0, "") for c in ds.cache_files]


class CorpusDatasource(FileBasedDatasource):
    """Reads every input file into RAW_SCHEMA rows, one reader per format."""

    def __init__(self, files: list[InputFile], filesystem: pafs.FileSystem):
        super().__init__([f.path for f in files], filesystem=filesystem)
        self._formats = {f.path: f.format for f in files}
        self._index = {f.path: i for i, f in enumerate(files)}

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        # Parquet readers seek to the footer; the other formats stream.
        if self._formats[path] == "parquet":
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        fmt = self._formats[path]
        if fmt == "parquet":
            rows = _parquet_rows(f)
        elif fmt == "hf_disk":
            rows = _arrow_stream_rows(f)
        else:
            rows = _json_rows(f, array_ok=fmt == "json")
        batch, base = [], self._index[path] << ORDER_BITS
        for row in rows:
            batch.append({"source": path, "order": base | row["row"], **row})
            if len(batch) == ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(batch, schema=RAW_SCHEMA)
                batch = []
        if batch:
            yield pa.Table.from_pylist(batch, schema=RAW_SCHEMA)


def _json_rows(f: pa.NativeFile, array_ok: bool) -> Iterator[dict]:
    head = f.read(CHUNK_BYTES)
    if array_ok and head.lstrip().startswith(b"["):
        yield from _json_array_rows(head + f.read())
        return
    for number, line in _lines(head, f):
        if line.strip():  # blank lines separate records; they are not rows
            yield _decoded(number, line)


def _lines(head: bytes, f: pa.NativeFile) -> Iterator[tuple[int, bytes]]:
    number, tail, chunk = 0, b"", head
    while chunk:
        parts = (tail + chunk).split(b"\n")
        tail = parts.pop()
        for part in parts:
            number += 1
            yield number, part.rstrip(b"\r")
        chunk = f.read(CHUNK_BYTES)
    if tail:
        yield number + 1, tail.rstrip(b"\r")


def _decoded(number: int, line: bytes) -> dict:
    try:
        return _row(number, line.decode("utf-8"))
    except UnicodeDecodeError as err:
        return _row(number, line.decode("utf-8", "backslashreplace"), "invalid_utf8", str(err))


def _json_array_rows(data: bytes) -> Iterator[dict]:
    # A JSON array is one document: if it does not decode or parse, the whole
    # file is one reject, numbered row 0.
    shown = data[:4096].decode("utf-8", "backslashreplace")
    try:
        records = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        yield _row(0, shown, "invalid_utf8", str(err))
        return
    except json.JSONDecodeError as err:
        yield _row(0, shown, "malformed_json", str(err))
        return
    for number, record in enumerate(records, start=1):
        yield _row(number, json.dumps(record, ensure_ascii=False))


def _parquet_rows(f: pa.NativeFile) -> Iterator[dict]:
    yield from _table_rows(pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BLOCK))


def _arrow_stream_rows(f: pa.NativeFile) -> Iterator[dict]:
    yield from _table_rows(pa.ipc.open_stream(f))


def _table_rows(batches) -> Iterator[dict]:
    number = 0
    for batch in batches:
        for record in batch.to_pylist():
            number += 1
            yield _row(number, json.dumps(record, ensure_ascii=False, default=str))


def _row(number: int, raw: str, reason: str | None = None, detail: str | None = None) -> dict:
    return {"row": number, "raw": raw, "reason": reason, "detail": detail}
