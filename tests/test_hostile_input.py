"""A 100k-row corpus with 10 % bad rows of every kind goes through the whole job: every row ends
up in the feature store or in rejects/ with its reason, and none in both or neither."""

import json

import pyarrow.parquet as pq
import pytest

from raysel.config import RunConfig
from raysel.pipeline import run
from tests.stages.test_prepare import read_rejects

pytestmark = pytest.mark.integration
N = 100_000


def good(i: int) -> dict:
    return {"id": f"g{i}", "instruction": f"What is {i} plus {i}?", "output": f"{2 * i}."}


BAD_KINDS = {  # kind -> the bad line made from row i (always after some good rows, for the duplicates)
    "malformed_json": lambda i: f'{{"id": "b{i}", "instruction": "unfinished'.encode(),
    "invalid_utf8": lambda i: f'{{"id": "b{i}", "instruction": "caf'.encode() + b'\xe9", "output": "x"}',
    "missing_field": lambda i: json.dumps({"id": f"b{i}", "instruction": "no output here"}).encode(),
    "wrong_type": lambda i: json.dumps({"id": f"b{i}", "instruction": "hi", "output": i}).encode(),
    "empty_text": lambda i: json.dumps({"id": f"b{i}", "instruction": "  ", "output": ""}).encode(),
    "duplicate_id": lambda i: json.dumps({**good(i), "id": f"g{i - 1}", "output": "another"}).encode(),
    "duplicate_text": lambda i: json.dumps({**good(i - 1), "id": f"b{i}"}).encode(),
    "not_a_record": lambda i: f"[{i}, {i}]".encode(),
}


def test_a_100k_corpus_with_10_percent_bad_rows_accounts_for_every_row(
    ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path
):
    kinds = list(BAD_KINDS)
    expected = {}  # 1-based line -> reason
    with open(tmp_path / "corpus.jsonl", "wb") as f:
        for i in range(N):
            if i % 10 == 3:
                kind = kinds[(i // 10) % len(kinds)]
                expected[i + 1] = kind
                f.write(BAD_KINDS[kind](i) + b"\n")
            else:
                f.write(json.dumps(good(i)).encode() + b"\n")
    cfg = RunConfig.model_validate(
        {
            "input": {"paths": [str(tmp_path / "corpus.jsonl")], "fields": {"id": "id"}},
            "prepare": {"max_tokens": 32, "rows_per_file": 8192},
            "model": {"name": str(tiny_model_dir)},
            "sae": {"path": str(tiny_sae_dir)},
            "encode": {"tokens_per_batch": 4096},
            "select": {"budget": 1000},
            "output": {"root": str(tmp_path / "out"), "report": False},
        }
    )
    manifest = run(cfg, until="select")

    counts = manifest["counts"]
    assert counts["n_input"] == N and counts["n_valid"] + counts["n_rejected"] == N
    assert counts["rejected_by_reason"] == {k: N // 10 // len(kinds) for k in kinds}
    rejects = read_rejects(tmp_path / "out")
    assert {r["row"]: r["reason"] for r in rejects} == expected and len(rejects) == len(expected)
    ids = pq.read_table(tmp_path / "out" / "features", columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == counts["n_encoded"] == N - len(expected)
    assert set(ids) == {f"g{i}" for i in range(N) if i + 1 not in expected}
    assert manifest["stages"]["select"]["budgets"]["coverage"] == 1000
