"""Locations beyond a local folder and s3://: gs:// through pyarrow's GCS client, and any fsspec
scheme through pyarrow's FSSpecHandler. No GCS, Azure or Hub server runs here, so the fsspec path is
exercised end to end with fsspec's own file:// filesystem, on a real Ray cluster: the input read by
the workers and the whole output root written through it."""

import json

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raysel import cli
from raysel.config import S3Config
from raysel.core.section import ConfigError
from raysel.core.storage import filesystem_for, redact
from tests.conftest import run_cfg


def test_each_scheme_gets_its_filesystem():
    gcs, path = filesystem_for("gs://bucket/runs/r1/", S3Config())
    assert isinstance(gcs, pafs.GcsFileSystem) and path == "bucket/runs/r1"
    fs, path = filesystem_for("file:///tmp/somewhere/", S3Config())
    assert isinstance(fs, pafs.PyFileSystem) and path == "/tmp/somewhere"
    with pytest.raises(ConfigError, match="unsupported location 'abfs://c/x': Install adlfs"):
        filesystem_for("abfs://c/x", S3Config())
    with pytest.raises(ConfigError, match="unsupported location 'nosuch://x'"):
        filesystem_for("nosuch://x", S3Config())


def test_secrets_of_other_filesystems_never_reach_a_message(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_verysecret")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "azkey==")
    assert redact("401 for hf_verysecret with azkey==", S3Config()) == "401 for <secret> with <secret>"


def test_a_run_reads_and_writes_through_an_fsspec_filesystem(ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path):
    raw = run_cfg(tmp_path, tiny_model_dir, tiny_sae_dir, 24)
    raw["input"]["paths"] = ["file://" + raw["input"]["paths"][0]]
    raw["sae"]["path"] = f"file://{tiny_sae_dir}"  # fetched once into model.cache_dir, like an s3:// SAE
    raw["model"]["cache_dir"] = str(tmp_path / "cache")
    raw["output"] = {"root": f"file://{tmp_path}/fsspec-out", "report": False}
    raw["select"] = {"budget": 6, "methods": ["coverage", "random"]}
    (tmp_path / "run.yaml").write_text(json.dumps(raw))
    assert cli.main(["run", str(tmp_path / "run.yaml")]) == 0
    assert [p.name for p in (tmp_path / "cache" / "saes" / "remote").glob("*/*")] != []
    out = tmp_path / "fsspec-out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["output"] == f"file://{tmp_path}/fsspec-out" and manifest["counts"]["n_encoded"] == 24
    assert pq.read_table(out / "features").num_rows == 24 and len(list((out / "features" / "_done").glob("*"))) == 3
    assert pq.read_table(out / "selection" / "coverage" / "selected.parquet").num_rows == 6
    assert cli.main(["run", str(tmp_path / "run.yaml")]) == 0  # a re-run finds the encode done through it too
    again = json.loads((out / "manifest.json").read_text())
    assert again["stages"]["encode"] == manifest["stages"]["encode"]  # the committed record: nothing redone
