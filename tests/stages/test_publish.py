"""The selection writer parses its records a part at a time, so that a large selection is never held
parsed; what it writes must be what one part, the whole selection at once, gives."""

import json
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from raysel.config import S3Config
from raysel.core.records import MESSAGES
from raysel.core.storage import Storage
from raysel.stages import publish

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("ab"), inner, max_size=2),
    max_leaves=5,
)
LICENCES = st.none() | st.sampled_from(["mit", "cc-by-4.0"]) | JSON_VALUES
RECORDS = st.lists(
    st.builds(
        lambda fields, licence: fields if licence is None else {**fields, "license": licence},
        st.dictionaries(st.sampled_from(["x", "y", "z", "id"]), JSON_VALUES, max_size=4),
        LICENCES,
    ),
    max_size=12,
)


def written(records: list[dict], part_rows: int, shard_bytes: int = 500 << 20) -> tuple:
    ids = [f"s{i}" for i in range(len(records))]
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(publish, "PART_ROWS", part_rows),
        mock.patch.object(publish, "SHARD_BYTES", shard_bytes),
    ):
        storage = Storage(tmp, S3Config())
        publish.write_selection(storage, "m", ids, np.arange(len(ids), dtype=float), np.zeros(len(ids), np.int64),
                                publish.records_of(ids, dict(zip(ids, map(json.dumps, records)))), {"counts": {}})  # fmt: skip
        base = Path(tmp, "selection", "m")
        files = sorted(p.name for p in (base / "data").iterdir())
        assert files == [f"train-{i:05d}-of-{len(files):05d}.parquet" for i in range(len(files))]
        return (
            pq.read_table(base / "data"),  # the shards in name order
            (base / "records.jsonl").read_text(),
            (base / "README.md").read_text(),
        )


@settings(max_examples=150, deadline=None, derandomize=True)
@given(records=RECORDS, part_rows=st.integers(1, 5), shard_bytes=st.integers(1, 300))
def test_a_selection_written_in_parts_and_shards_is_the_one_written_whole(records, part_rows, shard_bytes):
    """Catches a part whose field takes another type than the whole selection's (an int part beside a
    float part, a struct part missing a field), a field kept or dropped by one part alone, columns out
    of their first-seen order, rows written twice or out of rank order (also across the dataset's
    shard files), and licences counted in one part only (the card names them)."""
    parted, whole = written(records, part_rows, shard_bytes), written(records, 10**6)
    assert parted[0].schema == whole[0].schema
    assert parted[0].to_pylist() == whole[0].to_pylist()
    assert parted[1:] == whole[1:]
    assert parted[0].num_rows == len(records)


def test_the_dataset_is_sharded_by_the_records_bytes_and_loads_whole_in_rank_order(tmp_path):
    """Would catch one file whatever the size, shards of a stale earlier write left beside new ones (the
    loader would read both), or shards named out of rank order."""
    import datasets

    records = [{"k": "x" * 100, "n": i} for i in range(10)]  # 118 B a line: 1,180 B in all
    ids = [f"s{i}" for i in range(10)]
    storage = Storage(str(tmp_path), S3Config())
    for shard_bytes in (1, 500):  # 10 parts in 10 files, then in 3 (of 4, 4, 2 parts)
        with mock.patch.object(publish, "PART_ROWS", 1), mock.patch.object(publish, "SHARD_BYTES", shard_bytes):
            publish.write_selection(storage, "m", ids, np.arange(10.0), np.zeros(10, np.int64),
                                    publish.records_of(ids, dict(zip(ids, map(json.dumps, records)))), {"counts": {}})  # fmt: skip
    files = sorted(p.name for p in (tmp_path / "selection" / "m" / "data").iterdir())
    assert files == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert [pq.read_metadata(tmp_path / "selection" / "m" / "data" / f).num_rows for f in files] == [4, 4, 2]
    ds = datasets.load_dataset(str(tmp_path / "selection" / "m"), split="train")
    assert ds["id"] == ids and ds["n"] == list(range(10))


def test_an_int_past_int64_in_one_part_leaves_its_field_to_record():
    """The promoted type of a field can still refuse one part's values: ints of int64 in one part and
    one past it in another unify to int64, which cannot hold it. The field is left to `record`, not
    the run aborted, and every row is written."""
    records = [{"n": 1, "k": "a"}, {"n": 2**63, "k": "b"}]
    data = written(records, 1)[0]
    assert data.column_names == ["rank", "id", "score", "messages", "k", "record"]
    assert [json.loads(r)["n"] for r in data["record"].to_pylist()] == [1, 2**63]


def test_the_picks_records_spilled_by_part_are_the_prepared_ones_in_each_methods_order(tmp_path):
    """Catches a pick's record read from another row (its place in one method's order taken for
    another's), a part cut at the wrong rank, a pick in two methods kept for one only, and a batch of
    the prepared shards read once per method but written to one method's parts. Three shards, parts
    of 2 picks, two methods that share picks in different orders."""
    import pyarrow as pa

    storage = Storage(str(tmp_path), S3Config())
    (tmp_path / "prepared").mkdir()
    corpus = {f"r{i}": json.dumps({"text": f"row {i}", "n": i}) for i in range(9)}
    for shard, names in enumerate((["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6", "r7", "r8"])):
        turns = [[{"role": "user", "content": f"row {n}"}] for n in names]
        table = pa.table({"id": names, "record": [corpus[n] for n in names], "messages": pa.array(turns, MESSAGES),
                          "n_response_tokens": [1] * 3})  # fmt: skip
        pq.write_table(table, tmp_path / "prepared" / f"{shard}.parquet")
    picks = {"a": ["r7", "r1", "r4", "r0", "r8"], "b": ["r1", "r7", "r3"]}
    with mock.patch.object(publish, "PART_ROWS", 2):
        records = publish.PickedRecords(storage, picks, str(tmp_path / "spill"))
        for method, ids in picks.items():
            parts = [slice(lo, min(lo + 2, len(ids))) for lo in range(0, len(ids), 2)]
            got = [r for part in parts for r in records.of(method)(part).to_pylist()]
            assert [r["record"] for r in got] == [corpus[i] for i in ids]
            assert [r["messages"][0]["content"] for r in got] == [f"row {i}" for i in ids]  # the pick's own turns


def test_licences_take_the_hubs_ids_and_sizes_its_buckets():
    """The Hub rejects a card whose licence is not one of its ids: `Apache 2.0` must become apache-2.0."""
    assert [publish.hub_licence(n) for n in ("MIT", "Apache 2.0", "apache-2.0", "CC-BY-SA-4.0", "CC0", "WTFPL")] == [
        "mit", "apache-2.0", "apache-2.0", "cc-by-sa-4.0", "cc0-1.0", "other"]  # fmt: skip
    assert [publish.size_category(n) for n in (0, 999, 1000, 250_000, 10**9)] == [
        "n<1K", "n<1K", "1K<n<10K", "100K<n<1M", "100M<n<1B"]  # fmt: skip
