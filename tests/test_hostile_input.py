"""A 100k-row corpus with 10 % bad rows of every kind goes through `raysel run`: every row ends up in
the feature store or in rejects/ with its reason, and none in both or neither; every physical line
is a row or a counted blank line; the selected records come back as they were written, whatever
types their extra fields take."""

import json

import pyarrow.parquet as pq
import pytest
import yaml

from raysel import cli
from tests.stages.test_prepare import read_rejects

pytestmark = pytest.mark.integration
N = 100_000


# An extra field whose type changes from row to row, as in real merged corpora.
META = [lambda i: i, lambda i: f"m{i}", lambda i: {}, lambda i: 2**70 + i, lambda i: [i, "x", None], lambda i: None]


def good(i: int) -> dict:
    return {"id": f"g{i}", "instruction": f"What is {i} plus {i}?", "output": f"{2 * i}.", "meta": META[i % 6](i)}


BAD_KINDS = {  # kind -> the bad line made from row i (always after some good rows, for the duplicates)
    "malformed_json": lambda i: f'{{"id": "b{i}", "instruction": "unfinished'.encode(),
    "invalid_utf8": lambda i: f'{{"id": "b{i}", "instruction": "caf'.encode() + b'\xe9", "output": "x"}',
    "missing_field": lambda i: json.dumps({"id": f"b{i}", "instruction": "no output here"}).encode(),
    "wrong_type": lambda i: json.dumps({"id": f"b{i}", "instruction": "hi", "output": i}).encode(),
    "empty_text": lambda i: json.dumps({"id": f"b{i}", "instruction": "  ", "output": ""}).encode(),
    "duplicate_id": lambda i: json.dumps({**good(i), "id": f"g{i - 1}", "output": "another"}).encode(),
    "duplicate_text": lambda i: json.dumps({**good(i - 1), "id": f"b{i}"}).encode(),
    "not_a_record": lambda i: f"[{i}, {i}]".encode(),
    "too_deep": lambda i: (
        f'{{"id": "b{i}", "instruction": "x", "output": "y", "n": '.encode() + b"[" * 3000 + b"]" * 3000 + b"}"
    ),
    "invalid_unicode": lambda i: f'{{"id": "b{i}", "instruction": "x", "output": "\\ud800"}}'.encode(),
    "number_out_of_range": lambda i: (
        f'{{"id": "b{i}", "instruction": "x", "output": "y", "n": 1{"0" * 5000}}}'.encode()
    ),
    "non_finite_number": lambda i: f'{{"id": "b{i}", "instruction": "x", "output": "y", "n": NaN}}'.encode(),
    "too_large": lambda i: json.dumps({"id": f"b{i}", "instruction": "x" * 9000, "output": "y"}).encode(),
}
ENDS = [b"\n", b"\r\n", b"\r"]  # one file, every line end


def test_a_100k_corpus_with_10_percent_bad_rows_accounts_for_every_row(
    ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path, capsys
):
    kinds = list(BAD_KINDS)
    expected, lines, blank = {}, {}, 0  # 1-based line -> reason; line -> the good line's bytes
    with open(tmp_path / "corpus.jsonl", "wb") as f:
        f.write(b"\xef\xbb\xbf")
        number = 0
        for i in range(N):
            number += 1
            if i % 10 == 3:
                kind = kinds[(i // 10) % len(kinds)]
                expected[number] = kind
                f.write(BAD_KINDS[kind](i) + ENDS[i % 3])
            else:
                lines[number] = json.dumps(good(i)).encode()
                f.write(lines[number] + ENDS[i % 3])
            if i % 1000 == 7:  # blank lines, counted apart
                number += 1
                blank += 1
                f.write(b"  " + ENDS[(i + 1) % 3])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"paths": [str(tmp_path / "corpus.jsonl")], "fields": {"id": "id"}},
        "prepare": {"max_tokens": 32, "rows_per_file": 8192, "max_row_bytes": 8192},
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "sae": {"path": str(tiny_sae_dir), "allow_poor_fit": True},  # random, not trained
        "encode": {"tokens_per_batch": 4096},
        "select": {"budget": 1000},
        "output": {"root": str(tmp_path / "out"), "report": False},
    }))  # fmt: skip
    assert cli.main(["run", str(config)]) == 0
    assert f"{blank} blank lines skipped" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())

    counts = manifest["counts"]
    assert counts["n_input"] == N and counts["n_valid"] + counts["n_rejected"] == N
    assert counts["n_blank_lines"] == blank
    assert counts["rejected_by_reason"] == {k: list(expected.values()).count(k) for k in kinds}
    rejects = read_rejects(tmp_path / "out")
    assert {r["row"]: r["reason"] for r in rejects} == expected and len(rejects) == len(expected)
    ids = pq.read_table(tmp_path / "out" / "features", columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == counts["n_encoded"] == N - len(expected)
    assert set(ids) == {json.loads(line)["id"] for line in lines.values()}

    by_id = {json.loads(line)["id"]: line for line in lines.values()}
    base = tmp_path / "out" / "selection" / "coverage"
    selected = pq.read_table(base / "selected.parquet")["id"].to_pylist()
    written = (base / "records.jsonl").read_bytes().split(b"\n")
    assert len(selected) == 1000 and written == [by_id[i] for i in selected] + [b""]
    records = pq.read_table(base / "data/train-00000-of-00001.parquet")
    assert records["record"].to_pylist() == [by_id[i].decode() for i in selected]
    assert "meta" not in records.column_names  # its type changes from row to row: only in `record`
    assert records["instruction"].to_pylist() == [json.loads(by_id[i])["instruction"] for i in selected]
