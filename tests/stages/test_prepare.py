"""The prepare stage on a real local Ray cluster: every row ends up valid or in
rejects/ with its reason, whatever the input format or shape."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysel.config import RunConfig, S3Config
from raysel.core.paths import marker
from raysel.core.storage import Storage
from tests.conftest import prepare, write_jsonl

GOOD = {"id": "a1", "instruction": "Name a prime number.", "output": "Seven is prime."}
LONG = {"id": "a9", "instruction": "Count.", "output": " ".join(f"number {i}" for i in range(200))}
CHAT = {"id": "m1", "messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}

# (line number in the file, the line, the reason it must be rejected with)
BAD = [
    (2, '{"id": "a2", "instruction": "unfinished', "malformed_json"),
    (3, b'{"id": "a3", "instruction": "caf\xe9", "output": "x"}', "invalid_utf8"),
    (4, {"id": "a4", "instruction": "no output here"}, "missing_field"),
    (5, {"id": "a5", "instruction": "hi", "output": 42}, "wrong_type"),
    (6, {"id": "a6", "instruction": "   ", "output": ""}, "empty_text"),
    (7, {"id": "a1", "instruction": "A different question", "output": "and answer"}, "duplicate_id"),
    (8, {**GOOD, "id": "a8"}, "duplicate_text"),
    (10, "[1, 2]", "not_a_record"),
]


def mixed_lines() -> list:
    lines = {1: GOOD, 9: LONG, 11: "", 12: CHAT} | {n: line for n, line, _ in BAD}
    return [lines[n] for n in sorted(lines)]


def make_cfg(tokenizer_dir, paths, root, **sections) -> RunConfig:
    raw = {
        "input": {"paths": [str(p) for p in paths], "fields": {"id": "id"}},
        "prepare": {"max_tokens": 64, "batch_size": 4},
        "model": {"name": str(tokenizer_dir)},
        "output": {"root": str(root)},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return RunConfig.model_validate(raw)


def read_rejects(root: Path) -> list[dict]:
    # split on \n only: a raw row may hold U+2028 or other characters that splitlines() breaks at
    files = sorted((root / "rejects").glob("*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().split("\n") if line]


def read_prepared(root: Path) -> list[dict]:
    return sorted(pq.read_table(root / "prepared").to_pylist(), key=lambda r: (r["source"], r["row"]))


@pytest.fixture(scope="module")
def mixed_run(ray_cluster, tiny_tokenizer_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    path = write_jsonl(tmp / "mixed.jsonl", mixed_lines())
    cfg = make_cfg(tiny_tokenizer_dir, [path], tmp / "out")
    summary = prepare(cfg, Storage(cfg.output.root, cfg.s3))
    return {
        "path": path,
        "root": tmp / "out",
        "cfg": cfg,
        "summary": summary,
        "rejects": read_rejects(tmp / "out"),
        "prepared": read_prepared(tmp / "out"),
    }


@pytest.mark.parametrize("line, content, reason", BAD, ids=[b[2] for b in BAD])
def test_bad_row_lands_in_rejects_with_its_reason(mixed_run, line, content, reason):
    found = [r for r in mixed_run["rejects"] if r["row"] == line]
    assert len(found) == 1, f"line {line} should be rejected exactly once"
    reject = found[0]
    assert reject["reason"] == reason
    assert reject["source"] == str(mixed_run["path"])
    assert reject["detail"]
    if isinstance(content, dict):
        assert json.loads(reject["raw"]) == content
    elif isinstance(content, bytes):
        assert reject["raw"] == content.decode("utf-8", "backslashreplace")  # the bad byte shows as \xe9
    else:
        assert reject["raw"] == content


def test_counts_add_up(mixed_run):
    s = mixed_run["summary"]
    assert s["n_input"] == 11  # the blank line 11 is not a row
    assert s["n_valid"] == len(mixed_run["prepared"]) == 3
    assert s["n_rejected"] == len(mixed_run["rejects"]) == len(BAD)
    assert s["n_input"] == s["n_valid"] + s["n_rejected"]
    assert s["rejected_by_reason"] == {reason: 1 for _, _, reason in BAD}
    assert Storage(str(mixed_run["root"]), mixed_run["cfg"].s3).read_json(marker("prepare")) == s


def test_first_occurrence_of_a_duplicate_is_kept(mixed_run):
    assert [r["id"] for r in mixed_run["prepared"]] == ["a1", "a9", "m1"]
    kept = mixed_run["prepared"][0]
    assert json.loads(kept["record"]) == GOOD
    dup = next(r for r in mixed_run["rejects"] if r["row"] == 8)
    assert dup["detail"].endswith("row 1")


def test_over_long_sample_is_truncated_and_flagged_not_dropped(mixed_run, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    long = next(r for r in mixed_run["prepared"] if r["id"] == "a9")
    assert long["truncated"] and long["n_tokens"] == 64 and long["n_tokens_full"] > 64
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert len(tok(long["text"])["input_ids"]) <= 64
    assert long["text"].startswith("### User:\nCount.\n\n### Assistant:\nnumber 0 number 1")
    short = next(r for r in mixed_run["prepared"] if r["id"] == "a1")
    assert not short["truncated"] and short["n_tokens"] == short["n_tokens_full"] < 64


def test_the_same_files_named_another_way_are_not_prepared_again(
    ray_cluster, tiny_tokenizer_dir, tmp_path, monkeypatch
):
    """Catches a fingerprint over input.paths as written: rerunning a job from another directory, or
    through a symlink, re-prepared (and so re-encoded) a corpus whose files had not changed."""
    (tmp_path / "data").mkdir()
    path = write_jsonl(tmp_path / "data" / "pool.jsonl", [GOOD, CHAT])
    (tmp_path / "link").symlink_to(tmp_path / "data")
    root = tmp_path / "out"
    first = prepare(make_cfg(tiny_tokenizer_dir, [path], root), Storage(str(root), S3Config()))
    written = {p: p.stat().st_mtime_ns for p in (root / "prepared").iterdir()}
    assert first["n_valid"] == 2 and written
    monkeypatch.chdir(tmp_path)
    for spelled in ("data/pool.jsonl", "link/pool.jsonl", "data/*.jsonl", "data", "./link/../data/pool.jsonl"):
        again = prepare(make_cfg(tiny_tokenizer_dir, [spelled], root), Storage(str(root), S3Config()))
        assert again == first, spelled
    assert {p: p.stat().st_mtime_ns for p in (root / "prepared").iterdir()} == written
    write_jsonl(tmp_path / "data" / "more.jsonl", [LONG])  # a new file under the directory: redone
    redone = prepare(make_cfg(tiny_tokenizer_dir, ["data"], root), Storage(str(root), S3Config()))
    assert redone["fingerprint"] != first["fingerprint"] and redone["n_valid"] == 3


def test_rerun_skips_when_inputs_are_unchanged_and_redoes_when_they_change(mixed_run):
    cfg, root = mixed_run["cfg"], mixed_run["root"]
    before = {p: p.stat().st_mtime_ns for p in (root / "prepared").iterdir()}
    again = prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert again == mixed_run["summary"]
    assert {p: p.stat().st_mtime_ns for p in (root / "prepared").iterdir()} == before

    with open(mixed_run["path"], "a") as f:
        f.write(json.dumps({"id": "z1", "text": "A new row."}) + "\n")
    redone = prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert redone["fingerprint"] != mixed_run["summary"]["fingerprint"]
    assert (redone["n_input"], redone["n_valid"]) == (12, 4)
    assert [r["id"] for r in read_prepared(root)] == ["a1", "a9", "m1", "z1"]
    assert len(read_rejects(root)) == len(BAD)  # rewritten, not appended


def test_dedup_can_be_turned_off(ray_cluster, tiny_tokenizer_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, "id": "b"}, {**GOOD, "id": "a1"}])
    cfg = make_cfg(tiny_tokenizer_dir, [path], tmp_path / "out", prepare={"dedup": False})
    s = prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert (s["n_valid"], s["rejected_by_reason"]) == (2, {"duplicate_id": 1})


RECORDS = [
    {"id": "r1", "instruction": "Say hi.", "input": "", "output": "Hi!"},
    {"id": "r2", "messages": [{"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "Bye!"}]},
    {"id": "r3", "text": "Plain text sample."},
]


def write_all_formats(d: Path) -> dict[str, Path]:
    import datasets

    d.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": write_jsonl(d / "a.jsonl", RECORDS)}
    paths["json"] = d / "b.json"
    paths["json"].write_text(json.dumps(RECORDS, indent=1))
    paths["json_lines_named_json"] = write_jsonl(d / "c.json", RECORDS)
    # parquet and arrow need one schema for all rows: fill the absent fields with nulls
    keys = sorted({k for r in RECORDS for k in r})
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in RECORDS])
    pq.write_table(table, d / "d.parquet")
    paths["parquet"] = d / "d.parquet"
    datasets.Dataset(table).save_to_disk(str(d / "hf"))
    paths["hf_disk"] = d / "hf"
    return paths


@pytest.mark.parametrize("fmt", ["jsonl", "json", "json_lines_named_json", "parquet", "hf_disk"])
def test_every_format_gives_the_same_samples(ray_cluster, tiny_chat_tokenizer_dir, tmp_path, fmt):
    path = write_all_formats(tmp_path / "in")[fmt]
    cfg = make_cfg(tiny_chat_tokenizer_dir, [path], tmp_path / "out")
    s = prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert (s["n_input"], s["n_valid"], s["n_rejected"]) == (3, 3, 0)
    rows = read_prepared(tmp_path / "out")
    assert [(r["id"], r["shape"], r["row"]) for r in rows] == [
        ("r1", "alpaca", 1),
        ("r2", "messages", 2),
        ("r3", "text", 3),
    ]
    assert [r["text"] for r in rows] == [
        "<|user|>Say hi.\n<|assistant|>Hi!\n",
        "<|user|>Say bye.\n<|assistant|>Bye!\n",
        "Plain text sample.",
    ]
    assert rows[0]["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    assert rows[2]["messages"] is None


def test_globs_and_directories_read_every_file_once(ray_cluster, tiny_chat_tokenizer_dir, tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(3):
        write_jsonl(tmp_path / "in" / f"part{i}.jsonl", [{"text": f"file {i} row {j}"} for j in range(4)])
    cfg = make_cfg(
        tiny_chat_tokenizer_dir,
        [tmp_path / "in" / "part*.jsonl", tmp_path / "in"],
        tmp_path / "out",
        input={"fields": {"id": None}},
    )
    s = prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert (s["n_input"], s["n_valid"]) == (12, 12)
    assert len(s["files"]) == 3
    assert len({r["id"] for r in read_prepared(tmp_path / "out")}) == 12
    # `*` stays within its folder (it once picked up old/ too), `**` recurses, as fsspec and datasets read them
    (tmp_path / "in" / "old").mkdir()
    write_jsonl(tmp_path / "in" / "old" / "part9.jsonl", [{"text": "an old row"}])
    for pattern, n in (("*.jsonl", 3), ("**/*.jsonl", 4)):
        cfg = make_cfg(tiny_chat_tokenizer_dir, [tmp_path / "in" / pattern], tmp_path / pattern.replace("*", "x"))
        assert len(prepare(cfg, Storage(cfg.output.root, cfg.s3))["files"]) == n, pattern


def test_a_cut_off_json_array_keeps_the_elements_before_the_cut(ray_cluster, tiny_chat_tokenizer_dir, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_bytes(b'\xef\xbb\xbf[{"id": "k", "text": "a"},\r\n {"text": ')  # with a BOM, as Windows tools write
    cfg = make_cfg(tiny_chat_tokenizer_dir, [bad], tmp_path / "out")
    s = prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert (s["n_input"], s["n_valid"], s["rejected_by_reason"]) == (2, 1, {"malformed_json": 1})
    assert read_rejects(tmp_path / "out")[0]["row"] == 2
    assert [r["id"] for r in read_prepared(tmp_path / "out")] == ["k"]


def test_line_ends_boms_and_blank_lines_are_all_accounted_for(ray_cluster, tiny_chat_tokenizer_dir, tmp_path):
    # CRLF, a lone CR (classic Mac) and LF in one file; a BOM at the head and one mid-file (files joined
    # with cat); blank and whitespace-only lines: 9 physical lines, 5 records, 4 blank.
    lines = [b'\xef\xbb\xbf{"id": "1", "text": "one"}', b"", b'{"id": "2", "text": "two"}', b"  ",
             b'\xef\xbb\xbf{"id": "3", "text": "three"}', b'{"id": "4", "text": "four"}', b"\t", b"",
             b'{"id": "5", "text": "five"}']  # fmt: skip
    ends = [b"\r\n", b"\r\n", b"\r", b"\r", b"\n", b"\r\n", b"\n", b"\r", b""]
    path = tmp_path / "ends.jsonl"
    path.write_bytes(b"".join(line + end for line, end in zip(lines, ends)))
    cfg = make_cfg(tiny_chat_tokenizer_dir, [path], tmp_path / "out")
    s = prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert (s["n_input"], s["n_blank_lines"], s["n_valid"], s["n_rejected"]) == (5, 4, 5, 0)
    assert [(r["id"], r["row"], r["text"]) for r in read_prepared(tmp_path / "out")] == [
        ("1", 1, "one"), ("2", 3, "two"), ("3", 5, "three"), ("4", 6, "four"), ("5", 9, "five")
    ]  # fmt: skip


def test_hf_load_dataset_path(ray_cluster, tiny_chat_tokenizer_dir, tmp_path):
    """input.hf_dataset: `datasets` resolves the split's files; a local data dir takes the Hub's place here."""
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", RECORDS)
    cfg = make_cfg(
        tiny_chat_tokenizer_dir,
        [],
        tmp_path / "out",
        input={"paths": [], "hf_dataset": str(tmp_path / "hub"), "hf_split": "train"},
    )
    s = prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert (s["n_input"], s["n_valid"]) == (3, 3)
    assert [r["id"] for r in read_prepared(tmp_path / "out")] == ["r1", "r2", "r3"]
    # the workers read the split's data files themselves (hf:// URIs for a Hub dataset), not a driver cache
    assert s["files"] == [str(tmp_path / "hub" / "train.jsonl")]


def test_missing_input_is_a_clear_error_before_any_work(ray_cluster, tiny_chat_tokenizer_dir, tmp_path):
    from raysel.core.corpus import InputError

    cfg = make_cfg(tiny_chat_tokenizer_dir, [tmp_path / "nope" / "*.jsonl"], tmp_path / "out")
    with pytest.raises(InputError, match="input.paths: nothing matches"):
        prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert not (tmp_path / "out").exists()


def test_template_error_is_a_reject_not_a_crash(ray_cluster, tiny_chat_tokenizer_dir, tmp_path):
    odd = {"id": "n1", "messages": [{"role": "narrator", "content": "Once upon a time"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [RECORDS[0], odd])
    cfg = make_cfg(tiny_chat_tokenizer_dir, [path], tmp_path / "out")
    s = prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert (s["n_valid"], s["rejected_by_reason"]) == (1, {"template_error": 1})
    assert read_rejects(tmp_path / "out")[0]["row"] == 2


def test_missing_model_directory_is_a_config_error(ray_cluster, tmp_path):
    from raysel.config import ConfigError

    path = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    cfg = make_cfg(tmp_path / "no-such-model", [path], tmp_path / "out")
    with pytest.raises(ConfigError, match="model.name: .*no-such-model.* is not a model directory"):
        prepare(cfg, Storage(cfg.output.root, cfg.s3))


def test_a_row_dropped_as_repeated_text_frees_its_id(ray_cluster, tiny_tokenizer_dir, tmp_path):
    b = {**GOOD, "id": "y"}  # same text as GOOD: dropped as duplicate_text
    c = {"id": "y", "text": "Another text with the id of the dropped row."}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, b, c, {**c, "text": "Third text, id y again."}])
    cfg = make_cfg(tiny_tokenizer_dir, [path], tmp_path / "out")
    s = prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert s["rejected_by_reason"] == {"duplicate_text": 1, "duplicate_id": 1}
    assert [(r["id"], r["row"]) for r in read_prepared(tmp_path / "out")] == [("a1", 1), ("y", 3)]
    rejects = {r["row"]: r for r in read_rejects(tmp_path / "out")}
    assert rejects[2]["reason"] == "duplicate_text" and rejects[4]["reason"] == "duplicate_id"
    assert rejects[4]["detail"] == f"same id as {path} row 3"


def test_a_side_set_is_known_by_its_bytes_not_by_where_it_lies(tiny_tokenizer_dir, tmp_path):
    """The bug: a side set's key held its path and time, so the bundled reference, reached through
    another install of the package, was prepared and encoded again, and every selection that reads
    it redone (igds for 20 minutes in benchmarks/downstream.py). A run's input keeps its path."""
    import shutil
    import time

    from raysel.stages.prepare import Prepare

    rows = [{"id": f"r{i}", "instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]
    (tmp_path / "a").mkdir()
    here = write_jsonl(tmp_path / "a" / "set.jsonl", rows)
    time.sleep(0.01)
    there = tmp_path / "b" / "set.jsonl"
    there.parent.mkdir()
    shutil.copyfile(here, there)  # another path and another time, the same bytes

    def key(path, by_content=True):
        cfg = make_cfg(tiny_tokenizer_dir, [path], tmp_path / "out")
        storage = Storage(str(tmp_path / "out"), cfg.s3)
        return Prepare(cfg.input, cfg.prepare, cfg.model, cfg.s3, storage, by_content).fingerprint

    assert key(here) == key(there)
    assert key(here, by_content=False) != key(there, by_content=False)
    there.write_text(there.read_text().replace('"a3"', '"a4"'))  # one byte edited in place
    assert key(there) != key(here)


def test_sharegpt_rows_are_detected_and_their_roles_mapped(ray_cluster, tiny_chat_tokenizer_dir, tmp_path):
    """The bug: ShareGPT's `conversations` of {from, value} was no known shape, and roles human/gpt
    passed unmapped, so the template saw roles it does not know and longest counted 0 response tokens."""
    rows = [
        {"id": "g1", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "A prime?"},
                                       {"from": "gpt", "value": "Two."}]},
        {"id": "g2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "helper", "value": "Hello"}]},
        {"id": "g3", "conversations": "not a list of turns"},
        {"id": "m1", "messages": [{"role": "human", "content": "Hey"}, {"role": "gpt", "content": "Hey you"}]},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    cfg = make_cfg(
        tiny_chat_tokenizer_dir,
        [path],
        tmp_path / "out",
        input={"fields": {"id": "id", "role_map": {"helper": "assistant"}}},
    )
    summary = prepare(cfg, Storage(cfg.output.root, cfg.s3))
    got = {r["id"]: r for r in read_prepared(tmp_path / "out")}
    assert summary["n_valid"] == 3 and [r["reason"] for r in read_rejects(tmp_path / "out")] == ["wrong_type"]
    assert [m["role"] for m in got["g1"]["messages"]] == ["system", "user", "assistant"]
    assert [m["role"] for m in got["g2"]["messages"]] == ["user", "assistant"]  # input.fields.role_map
    assert [m["role"] for m in got["m1"]["messages"]] == ["user", "assistant"]  # chat rows map the same roles
    assert (got["g1"]["shape"], got["m1"]["shape"]) == ("sharegpt", "messages")
    for r in got.values():
        assert r["n_response_tokens"] > 0 and "<|assistant|>" in r["text"]  # the template knew its roles


def test_a_multi_config_hub_dataset_is_read_by_its_config(ray_cluster, tiny_chat_tokenizer_dir, tmp_path):
    """input.hf_config: the configs declared in the dataset card, as the Hub declares them (a local
    folder takes the Hub's place). Without it, a multi-config dataset is a clear error naming its configs."""
    from raysel.core.corpus import InputError

    hub = tmp_path / "hub"
    for name, rows in (("math", RECORDS[:2]), ("code", RECORDS[2:])):
        (hub / name).mkdir(parents=True)
        write_jsonl(hub / name / "train.jsonl", rows)
    (hub / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: math\n  data_files:\n  - split: train\n    path: math/train.jsonl\n"
        "- config_name: code\n  data_files:\n  - split: train\n    path: code/train.jsonl\n---\n"
    )

    def cfg(**hf):
        return make_cfg(
            tiny_chat_tokenizer_dir, [], tmp_path / "out", input={"paths": [], "hf_dataset": str(hub), **hf}
        )

    s = prepare(cfg(hf_config="code"), Storage(str(tmp_path / "out"), cfg().s3))
    assert s["files"] == [str(hub / "code" / "train.jsonl")] and s["n_valid"] == len(RECORDS[2:])
    with pytest.raises(InputError, match=r"input.hf_config: .*(math|code)"):
        prepare(cfg(), Storage(str(tmp_path / "none"), cfg().s3))


def test_csv_and_zstd_inputs_are_read_as_written(ray_cluster, tiny_chat_tokenizer_dir, tmp_path):
    """CSV (a header row; every value its text: `007` is no int 7) and zstd-compressed JSON lines, as
    the anchors read them; every row accounted for."""
    import pyarrow as pa

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text(
        'id,instruction,output\nc1,"Count, then stop.",007\nc2,"Two\nlines",ok\nc3,,\n', encoding="utf-8"
    )
    with pa.CompressedOutputStream(str(tmp_path / "in" / "b.jsonl.zst"), "zstd") as out:
        out.write(b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS))
    cfg = make_cfg(tiny_chat_tokenizer_dir, [tmp_path / "in"], tmp_path / "out")
    s = prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert (s["n_input"], s["n_valid"], s["rejected_by_reason"]) == (
        3 + len(RECORDS),
        2 + len(RECORDS),
        {"empty_text": 1},
    )
    got = {r["id"]: json.loads(r["record"]) for r in read_prepared(tmp_path / "out")}
    assert got["c1"] == {"id": "c1", "instruction": "Count, then stop.", "output": "007"}
    assert got["c2"]["instruction"] == "Two\nlines" and {r["id"] for r in RECORDS} <= set(got)
