"""A selection as a dataset: how every selection is written under selection/<method>/, and
`raysel push`, which uploads one to the Hugging Face Hub.

    data/train-00000-of-00001.parquet   rank, id, score, each original field that keeps one Arrow
                       type across the selection, and `record` (the input row as JSON): what
                       `datasets.load_dataset(folder, split="train")` loads
    README.md          the dataset card: YAML front matter (configs, licence, tags) and what the
                       selection is (method, budget, counts, model, SAE, coverage)
    records.jsonl      the selected rows, each line the input row as it was written
    selected.parquet   rank, id, gain and new_features (the features the pick adds to the union)
    manifest.json      written last: the selection is committed
"""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from raysel.core import paths
from raysel.core.section import ConfigError
from raysel.core.storage import Storage

DATA_FILE = "data/train-00000-of-00001.parquet"
CORE_COLUMNS = ("rank", "id", "score", "record")
LICENCE_FIELDS = ("license", "licence")


def write_selection(storage: Storage, method: str, ids, gains, new, records_by_id: dict, manifest: dict) -> dict:
    base = paths.selection(method)
    storage.remove(f"{base}/manifest.json")  # a half-rewritten selection must not look finished
    storage.fs.create_dir(storage.path(base, "data"), recursive=True)
    selected = pa.table(
        {
            "rank": pa.array(np.arange(1, len(ids) + 1, dtype=np.int32)),
            "id": pa.array(list(ids), pa.string()),
            "gain": pa.array(gains, pa.float64(), from_pandas=True),  # NaN (no gain) -> null
            "new_features": pa.array(new, pa.int64()),
        }
    )
    pq.write_table(selected, storage.path(base, "selected.parquet"), filesystem=storage.fs)
    raw = [records_by_id[i] for i in ids]
    with storage.fs.open_output_stream(storage.path(base, "records.jsonl")) as f:
        f.write("".join(r + "\n" for r in raw).encode())
    data = dataset_table(selected, raw)
    pq.write_table(data, storage.path(base, DATA_FILE), filesystem=storage.fs)
    with storage.fs.open_output_stream(storage.path(base, "README.md")) as f:
        f.write(dataset_card(manifest, data.column_names, licences(raw)).encode())
    storage.write_json(f"{base}/manifest.json", manifest)  # last: the selection is committed
    return manifest


def dataset_table(selected: pa.Table, raw: list[str]) -> pa.Table:
    """The selected records with a schema that cannot fail: rank, id and score, then each original
    top-level field that takes one Arrow type across the selection, then the whole original record as
    JSON. A field whose type changes from row to row, or that no Arrow type holds (an int beyond int64),
    or that parquet cannot hold, or that is named like a core column, is in `record` only."""
    table = pa.table({"rank": selected["rank"], "id": selected["id"], "score": selected["gain"]})
    records = [json.loads(r) for r in raw]
    for key in dict.fromkeys(k for r in records for k in r):
        if key in CORE_COLUMNS:
            continue
        try:
            column = pa.array([r.get(key) for r in records])
        except Exception:  # mixed or unrepresentable types: ArrowInvalid, ArrowTypeError, OverflowError...
            continue
        if parquet_can_hold(column.type):
            table = table.append_column(key, column)
    return table.append_column("record", pa.array(raw, pa.string()))


def parquet_can_hold(t: pa.DataType, depth: int = 0) -> bool:
    """Parquet writes no struct without fields ({}), and its readers refuse schemas nested past 100 levels."""
    if pa.types.is_struct(t) and t.num_fields == 0:
        return False
    return depth < 32 and all(parquet_can_hold(t.field(i).type, depth + 1) for i in range(t.num_fields))


def licences(raw: list[str]) -> dict[str, int]:
    """The licences the selected rows name in a `license` (or `licence`) field, with their counts."""
    found: dict[str, int] = {}
    for r in raw:
        record = json.loads(r)
        for key in LICENCE_FIELDS:
            if isinstance(record.get(key), str):
                found[record[key]] = found.get(record[key], 0) + 1
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def dataset_card(manifest: dict, columns: list[str], found: dict[str, int]) -> str:
    """README.md with the Hub's YAML front matter: the loadable config, the licence, tags."""
    front = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
        "license": next(iter(found)) if len(found) == 1 else ("other" if found else "unknown"),
        "tags": ["raysel", "data-selection", "sparse-autoencoder"],
        "pretty_name": f"raysel {manifest.get('method')} selection",
    }
    counts = manifest.get("counts", {})
    facts = {
        "method": manifest.get("method"),
        "budget": manifest.get("budget"),
        "selected": counts.get("n_selected"),
        "encoded pool": counts.get("n_encoded"),
        "input rows": counts.get("n_input"),
        "rejected rows": counts.get("n_rejected"),
        "model": manifest.get("model"),
        "SAE": f"{manifest.get('sae')} (layer {manifest.get('layer')})" if manifest.get("sae") else None,
        "activation threshold τ": manifest.get("tau"),
        "feature coverage at this budget": manifest.get("coverage_at_budget"),
    }
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items() if v is not None)
    licence_text = (
        ", ".join(f"`{name}` ({n} rows)" for name, n in found.items())
        if found
        else "none found in the rows' `license` field: the input's own licence applies; check it before sharing"
    )
    return f"""---
{yaml.safe_dump(front, sort_keys=False, allow_unicode=True)}---

# {front["pretty_name"]}

Selected by raysel, which picks instruction-tuning data by the sparse-autoencoder features a model
activates on each sample.

| | |
|---|---|
{rows}

## Columns

`rank` (1 = picked first), `id`, `score` (the method's gain or score for the pick), the original
fields that keep one type across the selection ({", ".join(f"`{c}`" for c in columns[3:-1]) or "none"}), and
`record`: each input row as JSON, every field whatever its type. `records.jsonl` holds the rows as
written; `manifest.json` the full config, versions and fingerprints.

## Licences

{licence_text}.

## Loading

```python
from datasets import load_dataset

ds = load_dataset("PATH_OR_REPO_ID", split="train")
```
"""


def push(storage: Storage, method: str, repo_id: str, private: bool = False, api=None) -> str:
    """Upload selection/<method>/ to a Hub dataset repo (created if needed); its URL."""
    from huggingface_hub import HfApi

    base = paths.selection(method)
    if storage.read_json(f"{base}/manifest.json") is None:
        selector = pafs.FileSelector(storage.path(paths.SELECTION), allow_not_found=True)
        found = sorted(i.base_name for i in storage.fs.get_file_info(selector) if i.type == pafs.FileType.Directory)
        raise ConfigError(f"push: {storage.uri(base)} holds no finished selection (methods found: {found or 'none'})")
    api = api or HfApi()
    with tempfile.TemporaryDirectory() as folder:
        pafs.copy_files(storage.path(base), folder, source_filesystem=storage.fs)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=folder, repo_id=repo_id, repo_type="dataset", commit_message=f"raysel selection: {method}"
        )
    return f"https://huggingface.co/datasets/{repo_id}"
