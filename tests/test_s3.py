"""Reading a corpus from, and writing a run to, a real S3 server (SeaweedFS on loopback)."""

import json
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from raysel import cli
from raysel.config import RunConfig
from raysel.core.corpus import InputError
from raysel.core.features import FeatureStore
from raysel.core.paths import marker
from raysel.core.storage import Storage
from raysel.pipeline import run
from tests.conftest import DEMO, free_port, prepare, run_cfg
from tests.stages.test_prepare import BAD, mixed_lines


def put(fs, path: str, lines: list) -> None:
    with fs.open_output_stream(path) as f:
        for line in lines:
            f.write(
                (json.dumps(line) if isinstance(line, dict) else line).encode() if not isinstance(line, bytes) else line
            )
            f.write(b"\n")


def s3_cfg(server, tokenizer_dir, paths, root, **s3) -> RunConfig:
    return RunConfig.model_validate(
        {
            "input": {"paths": paths, "fields": {"id": "id"}},
            "prepare": {"max_tokens": 64},
            "model": {"name": str(tokenizer_dir)},
            "output": {"root": root},
            "s3": {**server.config(), **s3},
        }
    )


def test_prepare_reads_and_writes_s3(ray_cluster, s3_server, tiny_tokenizer_dir):
    fs = s3_server.filesystem()
    fs.create_dir("corpus")
    fs.create_dir("results")
    lines = mixed_lines()
    put(fs, "corpus/in/part-0.jsonl", lines[:6])
    put(fs, "corpus/in/part-1.jsonl", lines[6:])
    put(fs, "corpus/in/notes.txt", ["not matched by the glob"])

    cfg = s3_cfg(s3_server, tiny_tokenizer_dir, ["s3://corpus/in/*.jsonl"], "s3://results/run1")
    s = prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert s["files"] == ["corpus/in/part-0.jsonl", "corpus/in/part-1.jsonl"]
    assert s["n_input"] == 11 and s["n_input"] == s["n_valid"] + s["n_rejected"]
    assert s["rejected_by_reason"] == {reason: 1 for _, _, reason in BAD}

    prepared = pq.read_table("results/run1/prepared", filesystem=fs)
    assert sorted(prepared["id"].to_pylist()) == ["a1", "a9", "m1"]
    rejects = [
        json.loads(line)
        for info in fs.get_file_info(_selector("results/run1/rejects"))
        for line in fs.open_input_stream(info.path).read().decode().splitlines()
    ]
    assert len(rejects) == len(BAD)
    assert Storage("s3://results/run1", cfg.s3).read_json(marker("prepare")) == s


def test_wrong_credentials_fail_clearly_and_write_nothing(ray_cluster, s3_server, tiny_tokenizer_dir):
    fs = s3_server.filesystem()
    fs.create_dir("corpus2")
    put(fs, "corpus2/a.jsonl", [{"id": "x", "text": "hello"}])
    cfg = s3_cfg(
        s3_server, tiny_tokenizer_dir, ["s3://corpus2/*.jsonl"], "s3://corpus2/out", secret_key="not-the-secret"
    )
    with pytest.raises(InputError) as err:
        prepare(cfg, Storage(cfg.output.root, cfg.s3))
    assert "s3://corpus2/*.jsonl" in str(err.value) and "signature" in str(err.value).lower()
    assert "not-the-secret" not in str(err.value) and s3_server.secret_key not in str(err.value)
    assert [i.path for i in fs.get_file_info(_selector("corpus2"))] == ["corpus2/a.jsonl"]


def _selector(path):
    return pafs.FileSelector(path, recursive=True)


def test_sae_from_s3_is_fetched_into_the_cache_and_loads(s3_server, tiny_sae_dir, tmp_path):
    from raysel.core.sae import load_sae, local_sae_dir

    fs = s3_server.filesystem()
    fs.create_dir("saes")
    for f in tiny_sae_dir.iterdir():
        with fs.open_output_stream(f"saes/tiny/{f.name}") as out:
            out.write(f.read_bytes())
    cfg = RunConfig.model_validate(
        {
            "input": {"paths": ["unused"]},
            "sae": {"path": "s3://saes/tiny"},
            "model": {"cache_dir": str(tmp_path / "cache")},
            "s3": s3_server.config(),
        }
    )
    local = local_sae_dir(cfg.stack())
    assert local.is_relative_to(tmp_path / "cache")
    assert (local / "sae_weights.safetensors").read_bytes() == (tiny_sae_dir / "sae_weights.safetensors").read_bytes()
    sae = load_sae(cfg.stack(), "cpu")
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (64, 128)
    # retrained under the same URI: the bug was a copy cached by the path's hash, never fetched again,
    # so the run encoded with the old weights (and keyed them as the old ones)
    from safetensors.torch import load_file, save

    weights = load_file(tiny_sae_dir / "sae_weights.safetensors")
    retrained = save(weights | {"W_enc": weights["W_enc"] * 1.5})
    time.sleep(1.1)  # S3's Last-Modified counts seconds, and the size is the same
    with fs.open_output_stream("saes/tiny/sae_weights.safetensors") as out:
        out.write(retrained)
    assert local_sae_dir(cfg.stack()) == local
    assert (local / "sae_weights.safetensors").read_bytes() == retrained
    assert not list(local.glob("*.part"))


def _files(fs, base: str) -> dict[str, bytes]:
    return {
        info.path.removeprefix(base + "/"): fs.open_input_stream(info.path).read()
        for info in fs.get_file_info(_selector(base))
        if info.type == pafs.FileType.File
    }


def test_run_to_s3_writes_what_the_same_run_writes_locally(
    ray_cluster, s3_server, tiny_model_dir, tiny_sae_dir, tmp_path, capsys
):
    raw = run_cfg(tmp_path, tiny_model_dir, tiny_sae_dir, 30)
    raw["select"] = {"budget": 8, "methods": ["coverage", "random"]}
    local = run(RunConfig.model_validate(raw), until="select")
    fs = s3_server.filesystem()
    fs.create_dir("runs")
    cfg = RunConfig.model_validate({**raw, "output": {"root": "s3://runs/a"}, "s3": s3_server.config()})
    remote = run(cfg, until="select")

    local_files, remote_files = _files(pafs.LocalFileSystem(), str(tmp_path / "out")), _files(fs, "runs/a")
    assert sorted(remote_files) == sorted(local_files)
    for method in ("coverage", "random"):
        for name in ("selected.parquet", "data/train-00000-of-00001.parquet"):
            path = f"selection/{method}/{name}"
            assert pq.read_table(fs.open_input_file(f"runs/a/{path}")).equals(pq.read_table(tmp_path / "out" / path))
        assert remote_files[f"selection/{method}/records.jsonl"] == local_files[f"selection/{method}/records.jsonl"]
    assert remote["counts"] == local["counts"] and remote["counts"]["n_encoded"] == 30
    assert Storage("s3://runs/a", cfg.s3).read_json("manifest.json")["output"] == "s3://runs/a"
    for blob in remote_files.values():  # the keys are in the config, and in no object written
        assert s3_server.secret_key.encode() not in blob and s3_server.access_key.encode() not in blob

    again = run(cfg, until="select")  # the finished encode on S3 is found by its marker and skipped whole
    assert again["stages"]["encode"] == remote["stages"]["encode"] and again["stages"]["encode"]["n_shards_encoded"] > 0
    # the shard markers, read 32 at a time from S3, are the local run's (what ran where aside)
    on_s3 = FeatureStore(Storage("s3://runs/a", cfg.s3)).done_shards()
    here = FeatureStore(Storage(str(tmp_path / "out"), cfg.s3)).done_shards()
    assert len(on_s3) == 4 and {n: m["rows"] for n, m in on_s3.items()} == {n: m["rows"] for n, m in here.items()}

    # `raysel status` reads where the run stands from the S3 root alone, as from another machine
    overrides = [arg for k, v in s3_server.config().items() for arg in ("--set", f"s3.{k}={v}")]
    assert cli.main(["status", "s3://runs/a", *overrides]) == 0
    status = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert status["finished"] and status["stages"]["encode"]["n_encoded"] == 30
    assert status["stages"]["select"]["state"] == "done"


@pytest.mark.parametrize(
    "root, s3, expect",
    [
        ("s3://runs/bad-key", {"secret_key": "wrong-secret-value"}, "access_denied"),
        ("s3://no-such-bucket/run", {}, "bucket 'no-such-bucket' does not exist"),
        ("s3://runs/wrong-endpoint", {"endpoint_override": f"127.0.0.1:{free_port()}"}, "could not connect to server"),
    ],
)
def test_an_unusable_output_root_fails_before_any_work_and_writes_nothing(
    s3_server, tmp_path, capsys, caplog, root, s3, expect
):
    fs = s3_server.filesystem()
    fs.create_dir("runs")
    before = sorted(_files(fs, "runs"))
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({"input": {"paths": [str(DEMO)]}, "output": {"root": root}, "s3": {**s3_server.config(), **s3}})
    )
    assert cli.main(["run", str(config)]) == 3
    err = capsys.readouterr().err
    assert root in err and expect in err.lower()
    assert sorted(_files(fs, "runs")) == before and fs.get_file_info("no-such-bucket").type == pafs.FileType.NotFound
    for secret in ("wrong-secret-value", s3_server.secret_key, s3_server.access_key):
        assert secret not in err and secret not in caplog.text


def test_only_transient_s3_errors_are_retried(s3_server):
    """The bug: every OSError was retried for s3.outage_seconds (120 s by default), so a 403 or a missing
    key held a shard for two minutes before it failed. Attempts are counted, not timed."""
    from raysel.core.storage import S3Config, StorageError

    fs = s3_server.filesystem()
    fs.create_dir("retries")
    calls = []

    def read(storage: Storage):
        calls.append(1)
        return storage.fs.open_input_stream(storage.path("x.json")).read()

    def attempts(s3: dict) -> tuple[int, str]:
        calls.clear()
        storage = Storage("s3://retries/run", S3Config.model_validate(s3_server.config() | s3))
        with pytest.raises(StorageError) as err:
            storage.retrying("reading x.json", lambda: read(storage))
        return len(calls), str(err.value)

    denied, message = attempts({"secret_key": "not-the-secret", "outage_seconds": 60})
    assert denied == 1 and "reading x.json at s3://retries/run failed: " in message and "outage" not in message
    missing, message = attempts({"outage_seconds": 60})
    assert missing == 1 and "s3://retries/run" in message
    down, message = attempts({"endpoint_override": f"127.0.0.1:{free_port()}", "outage_seconds": 8, "max_attempts": 1})
    assert down >= 2 and "(s3.outage_seconds)" in message and "NETWORK_CONNECTION" in message


def test_train_sae_writes_to_s3_and_the_run_encodes_with_it_from_there(
    ray_cluster, s3_server, tiny_model_dir, tiny_sae_dir, tmp_path
):
    """The bug: train-sae trained on the driver and saved to a local path, so on a cluster the SAE sat
    on the head's disk where no encode actor could read it. It trains in a Ray task now, and an
    s3:// train_sae.output is where every node finds it."""
    raw = run_cfg(tmp_path, tiny_model_dir, tiny_sae_dir, 16)
    del raw["sae"]["path"]  # the default SAE: the one train-sae makes
    raw["train_sae"] = {"layer": 1, "d_sae": 128, "k": 8, "training_tokens": 2048, "batch_size_tokens": 128,
                        "context_size": 64, "output": "s3://saes/trained"}  # fmt: skip
    raw["model"]["cache_dir"] = str(tmp_path / "cache")
    raw["s3"] = s3_server.config()
    fs = s3_server.filesystem()
    fs.create_dir("saes")
    trained = run(RunConfig.model_validate(raw), until="train_sae")["stages"]["train_sae"]
    assert trained["path"] == "s3://saes/trained" and trained["mean_l0"] == pytest.approx(8, abs=0.01)
    on_s3 = fs.open_input_stream("saes/trained/sae_weights.safetensors").read()
    assert json.loads(fs.open_input_stream("saes/trained/training.json").read())["k"] == 8
    encoded = run(RunConfig.model_validate(raw), until="encode")["stages"]["encode"]
    assert encoded["sae"] == "s3://saes/trained" and encoded["n_encoded"] == 16
    [copy] = (tmp_path / "cache" / "saes" / "remote").glob("*/sae_weights.safetensors")
    assert copy.read_bytes() == on_s3
