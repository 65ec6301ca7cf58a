"""Reading a corpus from, and writing a run to, a real S3 server (SeaweedFS on loopback)."""

import json

import pyarrow.parquet as pq
import pytest

from raysel.config import RunConfig
from raysel.corpus import InputError
from raysel.prepare import MARKER, run_prepare
from raysel.storage import Storage
from tests.test_prepare import BAD, mixed_lines


def put(fs, path: str, lines: list) -> None:
    with fs.open_output_stream(path) as f:
        for line in lines:
            f.write((json.dumps(line) if isinstance(line, dict) else line).encode()
                    if not isinstance(line, bytes) else line)
            f.write(b"\n")


def s3_cfg(server, tokenizer_dir, paths, root, **s3) -> RunConfig:
    return RunConfig.model_validate({
        "input": {"paths": paths, "fields": {"id": "id"}}, "prepare": {"max_tokens": 64},
        "model": {"name": str(tokenizer_dir)}, "output": {"root": root},
        "s3": {**server.config(), **s3},
    })


def test_prepare_reads_and_writes_s3(ray_cluster, s3_server, tiny_tokenizer_dir):
    fs = s3_server.filesystem()
    fs.create_dir("corpus")
    fs.create_dir("results")
    lines = mixed_lines()
    put(fs, "corpus/in/part-0.jsonl", lines[:6])
    put(fs, "corpus/in/part-1.jsonl", lines[6:])
    put(fs, "corpus/in/notes.txt", ["not matched by the glob"])

    cfg = s3_cfg(s3_server, tiny_tokenizer_dir, ["s3://corpus/in/*.jsonl"], "s3://results/run1")
    s = run_prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert s["files"] == ["corpus/in/part-0.jsonl", "corpus/in/part-1.jsonl"]
    assert s["n_input"] == 11 and s["n_input"] == s["n_valid"] + s["n_rejected"]
    assert s["rejected_by_reason"] == {reason: 1 for _, _, reason in BAD}

    prepared = pq.read_table("results/run1/prepared", filesystem=fs)
    assert sorted(prepared["id"].to_pylist()) == ["a1", "a9", "m1"]
    rejects = [json.loads(line) for info in fs.get_file_info(_selector("results/run1/rejects"))
               for line in fs.open_input_stream(info.path).read().decode().splitlines()]
    assert len(rejects) == len(BAD)
    assert Storage("s3://results/run1", cfg.s3).read_json(MARKER) == s


def test_wrong_credentials_fail_clearly_and_write_nothing(ray_cluster, s3_server, tiny_tokenizer_dir):
    fs = s3_server.filesystem()
    fs.create_dir("corpus2")
    put(fs, "corpus2/a.jsonl", [{"id": "x", "text": "hello"}])
    cfg = s3_cfg(s3_server, tiny_tokenizer_dir, ["s3://corpus2/*.jsonl"], "s3://corpus2/out",
                 secret_key="not-the-secret")
    with pytest.raises(InputError) as err:
        run_prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert "s3://corpus2/*.jsonl" in str(err.value) and "signature" in str(err.value).lower()
    assert "not-the-secret" not in str(err.value) and s3_server.secret_key not in str(err.value)
    assert [i.path for i in fs.get_file_info(_selector("corpus2"))] == ["corpus2/a.jsonl"]


def _selector(path):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, recursive=True)


def test_sae_from_s3_is_fetched_into_the_cache_and_loads(s3_server, tiny_sae_dir, tmp_path):
    from raysel.sae import load_sae, local_sae_dir

    fs = s3_server.filesystem()
    fs.create_dir("saes")
    for f in tiny_sae_dir.iterdir():
        with fs.open_output_stream(f"saes/tiny/{f.name}") as out:
            out.write(f.read_bytes())
    cfg = RunConfig.model_validate({"input": {"paths": ["unused"]}, "sae": {"path": "s3://saes/tiny"},
                                    "model": {"cache_dir": str(tmp_path / "cache")}, "s3": s3_server.config()})
    local = local_sae_dir(cfg)
    assert local.is_relative_to(tmp_path / "cache")
    assert (local / "sae_weights.safetensors").read_bytes() == (tiny_sae_dir / "sae_weights.safetensors").read_bytes()
    sae = load_sae(cfg, "cpu")
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (64, 128)
