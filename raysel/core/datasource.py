"""The input files as a Ray Data datasource: each file read by its format's reader (core/corpus.py)
into raw rows, with their source and order; kept apart so that reading a config never imports Ray."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.datasource import FileBasedDatasource

from raysel.core.corpus import ORDER_BITS, RAW_SCHEMA, ROWS_PER_BLOCK, InputFile, read_rows


class CorpusDatasource(FileBasedDatasource):
    """Reads every input file into RAW_SCHEMA rows, one reader per format. A row over `max_row_bytes`
    keeps only its head: it is rejected, and a file with no line ends never fills the memory."""

    def __init__(self, files: list[InputFile], filesystem: pafs.FileSystem, max_row_bytes: int):
        super().__init__([f.path for f in files], filesystem=filesystem)
        self._formats = {f.path: f.format for f in files}
        self._index = {f.path: i for i, f in enumerate(files)}
        self._limit = max_row_bytes

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        # Parquet readers seek to the footer; the other formats stream.
        if self._formats[path] == "parquet":
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        batch, base = [], self._index[path] << ORDER_BITS
        for row in read_rows(f, self._formats[path], self._limit):
            batch.append({"source": path, "order": base | row["row"], **row})
            if len(batch) == ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(batch, schema=RAW_SCHEMA)
                batch = []
        if batch:
            yield pa.Table.from_pylist(batch, schema=RAW_SCHEMA)
