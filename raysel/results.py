"""Writing a set of picked samples the way every selection is written:

    selection/<name>/selected.parquet   rank, id, gain (or score), new_features
    selection/<name>/records.parquet, records.jsonl   the records in their original fields
    selection/<name>/manifest.json      written last: the set is committed only then
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysel.storage import Storage


def write_selection(storage: Storage, method: str, ids, gains, new, records_by_id: dict, manifest: dict) -> dict:
    base = f"selection/{method}"
    storage.remove(f"{base}/manifest.json")  # a half-rewritten selection must not look finished
    storage.fs.create_dir(storage.path(base), recursive=True)
    selected = pa.table({"rank": pa.array(np.arange(1, len(ids) + 1, dtype=np.int32)),
                         "id": pa.array(list(ids), pa.string()),
                         "gain": pa.array(gains, pa.float64(), from_pandas=True),  # NaN (no gain) -> null
                         "new_features": pa.array(new, pa.int64())})
    pq.write_table(selected, storage.path(base, "selected.parquet"), filesystem=storage.fs)
    raw = [records_by_id[i] for i in ids]
    with storage.fs.open_output_stream(storage.path(base, "records.jsonl")) as f:
        f.write("".join(r + "\n" for r in raw).encode())
    records = [json.loads(r) for r in raw]
    keys = list(dict.fromkeys(k for r in records for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]),
                   storage.path(base, "records.parquet"), filesystem=storage.fs)
    storage.write_json(f"{base}/manifest.json", manifest)  # last: the selection is committed
    return manifest
