"""A selection as a dataset: how every selection is written under selection/<method>/, and
`raysel push`, which uploads one to the Hugging Face Hub.

    data/train-00000-of-0000N.parquet   rank, id, score, `messages` (the sample as chat turns of
                       role and content, TRL's conversational format; null for plain text), each
                       original field that keeps one Arrow type across the selection, and `record`
                       (the input row as JSON): what `datasets.load_dataset(folder, split="train")` loads;
                       one file per SHARD_BYTES of records (datasets' own max_shard_size), in rank order
    README.md          the dataset card: YAML front matter (configs, licence, tags) and what the
                       selection is (method, budget, counts, model, SAE, coverage)
    records.jsonl      the selected rows, each line the input row as it was written
    selected.parquet   rank, id, score (the greedy gain, or the method's score) and new_features (the
                       features the pick adds to the union)
    manifest.json      written last: the selection is committed

The picks' records come from PickedRecords, which spills them from the prepared shards to local
files, one per method and part of PART_ROWS picks. Each part is parsed twice: once for each field's
type across the selection, then to write the dataset file a row group a part. Parsed whole, 300k
records of 748 B took 1.35 GB beside their JSON; three selections of 100k, spilled and written a part
at a time, take 0.25 GB in all.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysel.core import paths
from raysel.core.features import SAE_FEATURES
from raysel.core.records import MESSAGES
from raysel.core.section import ConfigError
from raysel.core.storage import Storage

SHARD_BYTES = 500 << 20  # of the records' JSON, which parquet holds in less: datasets' max_shard_size
CORE_COLUMNS = ("rank", "id", "score", "messages", "sae_features", "record")
# a pick's strongest SAE features by their peak activation in the sample: why it was kept, filterable
TOP_FEATURES = 8
PART_ROWS = 20_000  # records parsed at once while a selection is written
# the picks in a slice of their rank order: `record` (the input row's JSON) and `messages` (its turns)
Records = Callable[[slice], pa.Table]
LICENCE_FIELDS = ("license", "licence")


def write_selection(
    storage: Storage, method: str, ids, scores, new, records: Records, manifest: dict, features: pa.Array | None = None
) -> dict:
    """selection/<method>/ for the picks `ids` in rank order; records(part) gives the records (JSON)
    of the picks in a slice of that order, PART_ROWS at most; `features`, each pick's strongest SAE
    features (SAE_FEATURES) where they were encoded."""
    base = paths.selection(method)
    storage.remove(f"{base}/manifest.json")  # a half-rewritten selection must not look finished
    storage.fs.create_dir(storage.path(base, "data"), recursive=True)
    selected = pa.table(
        {
            "rank": pa.array(np.arange(1, len(ids) + 1, dtype=np.int32)),
            "id": pa.array(list(ids), pa.string()),
            # as the dataset file names it; NaN (no score) -> null
            "score": pa.array(scores, pa.float64(), from_pandas=True),
            "new_features": pa.array(new, pa.int64()),
            **({"sae_features": features} if features is not None else {}),
        }
    )
    pq.write_table(selected, storage.path(base, "selected.parquet"), filesystem=storage.fs)
    parts = [slice(lo, min(lo + PART_ROWS, len(ids))) for lo in range(0, len(ids), PART_ROWS)] or [slice(0, 0)]
    sizes = [0] * len(parts)
    with storage.fs.open_output_stream(storage.path(base, "records.jsonl")) as f:
        # one read of a part for both, and its size
        types, found = field_types(
            _written(records(part)["record"].to_pylist(), f, sizes, i) for i, part in enumerate(parts)
        )
    for old in storage.listing(f"{base}/data"):  # an earlier write's shards, which may have been more
        storage.fs.delete_file(old.path)
    columns = write_dataset(storage, storage.path(base, "data"), selected, shards(parts, sizes), records, types)
    with storage.fs.open_output_stream(storage.path(base, "README.md")) as f:
        f.write(dataset_card(manifest, columns, found).encode())
    storage.write_json(f"{base}/manifest.json", manifest)  # last: the selection is committed
    return manifest


def _written(raw: list[str], f, sizes: list[int], i: int) -> list[str]:
    data = "".join(r + "\n" for r in raw).encode()
    f.write(data)
    sizes[i] = len(data)
    return raw


def shards(parts: list[slice], sizes: list[int]) -> list[list[slice]]:
    """The parts grouped into dataset files of about SHARD_BYTES each, in order (a part is never split)."""
    n = max(1, min(len(parts), -(-sum(sizes) // SHARD_BYTES)))
    per = -(-len(parts) // n)
    return [parts[i : i + per] for i in range(0, len(parts), per)]


def field_types(parts) -> tuple[dict[str, pa.DataType], dict[str, int]]:
    """Each original top-level field's Arrow type across the selection, and the licences the rows
    name, read a part (a list of records' JSON) at a time. A part's inferred types are promoted
    together as Arrow does within one array (int and float to float, structs to all their fields).
    A field no type holds (mixed types, an int beyond int64), that parquet cannot hold, or that is
    named like a core column is left to `record`."""
    types: dict[str, pa.DataType] = {}
    mixed, found = set(), {}
    for raw in parts:
        records = [json.loads(r) for r in raw]
        count_licences(records, found)
        for key in dict.fromkeys(k for r in records for k in r):
            if key in CORE_COLUMNS or key in mixed:
                continue
            try:
                t = pa.array([r.get(key) for r in records]).type
                types[key] = promoted(types[key], t) if key in types else t
            except Exception:  # ArrowInvalid, ArrowTypeError, OverflowError...
                mixed.add(key)
                types.pop(key, None)
    return {k: t for k, t in types.items() if parquet_can_hold(t)}, dict(sorted(found.items(), key=lambda kv: -kv[1]))


def promoted(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    return pa.unify_schemas([pa.schema([("f", a)]), pa.schema([("f", b)])], promote_options="permissive")[0].type


def records_of(ids, records_by_id: dict[str, str], messages_by_id: dict[str, list] | None = None) -> Records:
    """Records (and their turns, where known) from mappings held whole (a selection small enough to hold)."""
    messages_by_id = messages_by_id or {}
    return lambda part: pa.table(
        {
            "record": pa.array([records_by_id[i] for i in ids[part]], pa.string()),
            "messages": pa.array([messages_by_id.get(i) for i in ids[part]], MESSAGES),
        }
    )


PICKED = pa.schema([("id", pa.string()), ("record", pa.string()), ("messages", MESSAGES)])


class PickedRecords:
    """The picks' original records, read in one pass over the prepared shards and spilled to local
    parquet files, one per method and part of PART_ROWS picks in rank order: the driver holds a
    batch of the shards and a part, never the picks' records together."""

    def __init__(self, storage: Storage, picks: dict[str, list[str]], folder: str):
        self.picks, self.folder = picks, folder
        os.makedirs(folder, exist_ok=True)
        wanted = {m: pa.array(ids, pa.string()) for m, ids in picks.items()}
        writers: dict[tuple[str, int], pq.ParquetWriter] = {}
        dataset = pads.dataset(storage.path(paths.PREPARED), filesystem=storage.fs, format="parquet")
        try:
            # a part's rows a batch, read ahead one at a time: the scanner's defaults hold 64 batches
            for batch in dataset.to_batches(
                columns=["id", "record", "messages"], batch_size=PART_ROWS, batch_readahead=1, fragment_readahead=1
            ):
                for m, ids in wanted.items():
                    rank = pc.index_in(batch["id"], value_set=ids)  # the pick's place in m's order, or null
                    hit = np.flatnonzero(rank.is_valid().to_numpy(zero_copy_only=False))
                    part = rank.take(hit).to_numpy() // PART_ROWS
                    for k in np.unique(part):
                        rows = batch.take(hit[part == k])
                        if (m, k) not in writers:
                            writers[m, k] = pq.ParquetWriter(self._file(m, k), rows.schema)
                        writers[m, k].write_batch(rows)
        finally:
            for writer in writers.values():
                writer.close()

    def _file(self, method: str, k: int) -> str:
        return os.path.join(self.folder, f"{method}-{k}.parquet")

    def of(self, method: str) -> Records:
        def records(part: slice) -> pa.Table:
            path = self._file(method, part.start // PART_ROWS)
            table = pq.read_table(path) if os.path.exists(path) else PICKED.empty_table()
            ids = table["id"].combine_chunks()
            order = pc.index_in(pa.array(self.picks[method][part], pa.string()), value_set=ids)
            return table.take(order).select(["record", "messages"])

        return records


class _Unfit(Exception):
    def __init__(self, key: str):
        self.key = key


def write_dataset(
    storage: Storage, folder: str, selected: pa.Table, shards: list[list[slice]], records: Records, types: dict
) -> list[str]:
    """The dataset files, train-0000i-of-0000N.parquet under `folder`, a part at a time: rank, id, score,
    messages, sae_features, the typed fields, `record`. A field that one part's values do not fit in
    its promoted type (an int past int64 where the others are int64) is left to `record`, and the files
    written again. Returns the column names."""
    while True:
        schema = pa.schema(
            [
                ("rank", pa.int32()),
                ("id", pa.string()),
                ("score", pa.float64()),
                ("messages", MESSAGES),
                *([("sae_features", SAE_FEATURES)] if "sae_features" in selected.column_names else []),
                *types.items(),
                ("record", pa.string()),
            ]
        )
        try:
            for i, parts in enumerate(shards):
                path = f"{folder}/train-{i:05d}-of-{len(shards):05d}.parquet"
                with pq.ParquetWriter(path, schema, filesystem=storage.fs) as writer:
                    for part in parts:
                        writer.write_table(dataset_part(selected[part.start : part.stop], records(part), types, schema))
            return schema.names
        except _Unfit as e:
            del types[e.key]


def dataset_part(selected: pa.Table, picked: pa.Table, types: dict, schema: pa.Schema) -> pa.Table:
    raw = picked["record"].to_pylist()
    records = [json.loads(r) for r in raw]
    columns = [selected["rank"], selected["id"], selected["score"], picked["messages"]]
    columns += [selected["sae_features"]] if "sae_features" in selected.column_names else []
    for key, t in types.items():
        try:
            columns.append(pa.array([r.get(key) for r in records], type=t))
        except Exception as e:
            raise _Unfit(key) from e
    return pa.Table.from_arrays([*columns, pa.array(raw, pa.string())], schema=schema)


def parquet_can_hold(t: pa.DataType, depth: int = 0) -> bool:
    """Parquet writes no struct without fields ({}), and its readers refuse schemas nested past 100 levels."""
    if pa.types.is_struct(t) and t.num_fields == 0:
        return False
    return depth < 32 and all(parquet_can_hold(t.field(i).type, depth + 1) for i in range(t.num_fields))


def count_licences(records: list[dict], found: dict[str, int]) -> None:
    """Adds to `found` the licences the records name in a `license` (or `licence`) field."""
    for record in records:
        for key in LICENCE_FIELDS:
            if isinstance(record.get(key), str):
                found[record[key]] = found.get(record[key], 0) + 1


# The Hub's licence ids for the spellings rows use; another licence is `other`, named in the card's text
HUB_LICENCES = {"mit", "apache-2.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc0-1.0",
                "odc-by", "gpl-3.0", "bsd-3-clause", "llama2", "llama3", "openrail"}  # fmt: skip


def hub_licence(name: str) -> str:
    """`Apache 2.0`, `CC-BY-4.0`, `MIT` -> apache-2.0, cc-by-4.0, mit; `other` where the Hub has no id."""
    normal = "-".join(name.strip().lower().replace("_", " ").split())
    normal = {"apache-2": "apache-2.0", "apache": "apache-2.0", "cc0": "cc0-1.0"}.get(normal, normal)
    return normal if normal in HUB_LICENCES else "other"


def size_category(n: int) -> str:
    """The Hub's size_categories bucket for n rows."""
    for limit, name in ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
                        (10**7, "1M<n<10M"), (10**8, "10M<n<100M")):  # fmt: skip
        if n < limit:
            return name
    return "100M<n<1B"


def dataset_card(manifest: dict, columns: list[str], found: dict[str, int]) -> str:
    """README.md, its front matter from huggingface_hub's DatasetCardData: the loadable config, the
    licence as a Hub id, size and task categories, tags; then what the selection is."""
    from huggingface_hub import DatasetCard, DatasetCardData

    counts = manifest.get("counts", {})
    licences = sorted({hub_licence(name) for name in found})
    front = DatasetCardData(
        license=licences[0] if len(licences) == 1 else ("other" if licences else "unknown"),
        size_categories=[size_category(int(counts.get("n_selected") or 0))],
        task_categories=["text-generation"],
        tags=["raysel", "data-selection", "sparse-autoencoder"],
        pretty_name=f"raysel {manifest.get('method')} selection",
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
    )
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
    originals = ", ".join(f"`{c}`" for c in columns if c not in CORE_COLUMNS) or "none"
    card = f"""---
{front.to_yaml()}
---

# {front.pretty_name}

Selected by raysel, which picks instruction-tuning data by the sparse-autoencoder features a model
activates on each sample.

| | |
|---|---|
{rows}

## Columns

`rank` (1 = picked first), `id`, `score` (the method's gain or score for the pick), `messages`
(the sample as chat turns of role and content, as TRL's SFTTrainer reads them; null for plain
text), `sae_features` where the picks were encoded (their {TOP_FEATURES} strongest features of the SAE
above, as `feature` id and peak `activation` in the sample: filter or stratify by them), the original fields that keep one type across the selection ({originals}), and `record`:
each input row as JSON, every field whatever its type. `records.jsonl` holds the rows as written;
`manifest.json` the full config, versions and fingerprints.

## Licences

{licence_text}.

## Loading

```python
from datasets import load_dataset

ds = load_dataset("PATH_OR_REPO_ID", split="train")
```
"""
    return str(DatasetCard(card))  # parsed back by the Hub's own card class: its front matter holds


def check_finished(storage: Storage, method: str, verb: str) -> None:
    """A selection is read only once its manifest, written last, says it is whole."""
    if storage.read_json(f"{paths.selection(method)}/manifest.json") is None:
        selector = pafs.FileSelector(storage.path(paths.SELECTION), allow_not_found=True)
        found = sorted(i.base_name for i in storage.fs.get_file_info(selector) if i.type == pafs.FileType.Directory)
        raise ConfigError(
            f"{verb}: {storage.uri(paths.selection(method))} holds no finished selection (methods found: {found or 'none'})"
        )


RUN_FILES = ("records.jsonl", "selected.parquet", "manifest.json")  # pushed only when asked: the manifest names buckets


@dataclass
class PushOptions:
    repo_id: str
    private: bool = False
    revision: str | None = None  # a branch of the dataset repo, created from main if it does not exist
    message: str | None = None
    run_files: bool = False  # also records.jsonl, selected.parquet and manifest.json


def push(storage: Storage, methods: list[str], options: PushOptions, api=None) -> str:
    """Upload selections to a Hub dataset repo (created if needed): the data files and the card. One
    method's selection is the repo's default config; several are one config each, under <method>/data/."""
    from huggingface_hub import HfApi

    for method in methods:
        check_finished(storage, method, "push")
    api = api or HfApi()
    with tempfile.TemporaryDirectory() as folder:
        stage_upload(storage, methods, options.run_files, Path(folder))
        api.create_repo(options.repo_id, repo_type="dataset", private=options.private, exist_ok=True)
        if options.revision:
            api.create_branch(options.repo_id, branch=options.revision, repo_type="dataset", exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=options.repo_id, repo_type="dataset", revision=options.revision,
                          commit_message=options.message or f"raysel selection: {', '.join(methods)}")  # fmt: skip
    return f"https://huggingface.co/datasets/{options.repo_id}"


def stage_upload(storage: Storage, methods: list[str], run_files: bool, folder: Path) -> None:
    """The files a push uploads, laid out in `folder` as the repo will hold them."""
    from huggingface_hub import DatasetCard

    names = ["README.md", *RUN_FILES * run_files]
    if len(methods) == 1:
        base = paths.selection(methods[0])
        (folder / "data").mkdir()
        pafs.copy_files(storage.path(base, "data"), str(folder / "data"), source_filesystem=storage.fs)
        for name in names:
            pafs.copy_files(storage.path(base, name), str(folder / name), source_filesystem=storage.fs)
        return
    cards = []
    for method in methods:
        base = paths.selection(method)
        (folder / method / "data").mkdir(parents=True)
        pafs.copy_files(storage.path(base, "data"), str(folder / method / "data"), source_filesystem=storage.fs)
        for name in names[1:]:
            pafs.copy_files(storage.path(base, name), str(folder / method / name), source_filesystem=storage.fs)
        with storage.fs.open_input_stream(storage.path(base, "README.md")) as f:
            cards.append(DatasetCard(f.read().decode()))
    (folder / "README.md").write_text(combined_card(methods, cards))


def combined_card(methods: list[str], cards: list) -> str:
    """One card for several selections: a config per method, each method's own card text beneath."""
    from huggingface_hub import DatasetCard

    data = cards[0].data
    data.configs = [
        {"config_name": m, "data_files": [{"split": "train", "path": f"{m}/data/*.parquet"}]} for m in methods
    ]
    data.license = cards[0].data.license if len({c.data.license for c in cards}) == 1 else "other"
    data.pretty_name = f"raysel selections: {', '.join(methods)}"
    sections = "\n\n".join(f"## {m}\n\n{nested(c.text)}" for m, c in zip(methods, cards))
    load = f'load_dataset("PATH_OR_REPO_ID", "{methods[0]}", split="train")'
    return str(
        DatasetCard(
            f"---\n{data.to_yaml()}\n---\n\n# {data.pretty_name}\n\nOne config per method: `{load}`.\n\n{sections}\n"
        )
    )


def nested(text: str) -> str:
    """A card's text under a method's heading: its title dropped, its sections one level down."""
    lines = text.strip().splitlines()
    lines = lines[1:] if lines and lines[0].startswith("# ") else lines
    return "\n".join("#" + line if line.startswith("## ") else line for line in lines).strip()
