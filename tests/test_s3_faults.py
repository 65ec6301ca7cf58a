"""S3 going away in the middle of the encode stage's writes, on a real SeaweedFS stopped and
started again on the same ports and data: the run rides out a short outage, fails clearly on a
long one and then resumes, and either way ends with exactly the uninterrupted run's results."""

import json
import os
import subprocess
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raysel.core.paths import FEATURES_DONE as DONE
from tests.conftest import CLI_ENV as ENV
from tests.conftest import SeaweedS3, cli_command, interruptible_cfg

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "weed"
    root.mkdir()
    s = SeaweedS3(root)
    s.filesystem().create_dir("faults")
    yield s
    s.stop()


def s3_files(fs, base: str) -> list[str]:
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    return sorted(i.path.removeprefix(base + "/") for i in fs.get_file_info(selector) if i.is_file)


def outage_once_markers_appear(server: SeaweedS3, driver: subprocess.Popen, base: str, down_s: float) -> int:
    """Stop S3 once the encode stage has committed a few shards, keep it down `down_s`, start it
    again; how many shards were committed before."""
    fs, deadline = server.filesystem(), time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        done = [f for f in s3_files(fs, base) if f.startswith(DONE)]
        if len(done) >= 2:
            break
        time.sleep(0.1)
    server.stop()
    time.sleep(down_s)
    server.start()
    return len(done)


def assert_committed_results_equal(fs, base: str, clean) -> None:
    files = s3_files(fs, base)
    shards = {f.removeprefix("features/") for f in files if f.startswith("features/part-")}
    marked = {f.removeprefix(DONE + "/").removesuffix(".json") for f in files if f.startswith(DONE)}
    assert shards == marked and len(shards) == 30, "every features object is committed by its marker, no strays"
    assert not [f for f in files if f.endswith(".tmp")] and "manifest.json" in files
    with fs.open_input_file(f"{base}/manifest.json") as f:
        assert json.loads(f.read())["counts"]["n_encoded"] == 240
    features = pq.read_table(f"{base}/features", filesystem=fs).sort_by("id")
    assert features.equals(pq.read_table(clean / "features").sort_by("id"))
    for method in ("coverage", "random", "longest"):
        resumed = pq.read_table(f"{base}/selection/{method}/data/train-00000-of-00001.parquet", filesystem=fs)
        assert resumed.equals(pq.read_table(clean / "selection" / method / "data/train-00000-of-00001.parquet"))


def test_a_short_outage_mid_write_is_retried_through(server, tiny_model_dir, tiny_sae_dir, tmp_path, uninterrupted):
    raw = interruptible_cfg(
        tmp_path, tiny_model_dir, tiny_sae_dir, "s3://faults/short", server.config() | {"outage_seconds": 120}
    )
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen(
        cli_command(tmp_path, raw), env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        before = outage_once_markers_appear(server, driver, "faults/short", down_s=8)
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
        log.close()
    out = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, out[-4000:]
    assert 2 <= before < 30 and "retrying in" in out, "the outage should have hit the encode stage's IO"
    assert_committed_results_equal(server.filesystem(), "faults/short", uninterrupted)


def test_a_long_outage_fails_clearly_and_the_rerun_resumes(
    server, tiny_model_dir, tiny_sae_dir, tmp_path, uninterrupted
):
    raw = interruptible_cfg(
        tmp_path, tiny_model_dir, tiny_sae_dir, "s3://faults/long", server.config() | {"outage_seconds": 3}
    )
    cmd = cli_command(tmp_path, raw)
    driver = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        before = outage_once_markers_appear(server, driver, "faults/long", down_s=20)
        _, err = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
    assert driver.returncode == 3, err[-4000:]
    assert "s3://faults/long" in err and "s3.outage_seconds" in err
    assert server.secret_key not in err and server.access_key not in err
    fs = server.filesystem()
    committed = [f for f in s3_files(fs, "faults/long") if f.startswith(DONE)]
    assert "manifest.json" not in s3_files(fs, "faults/long") and before <= len(committed) < 30

    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    with fs.open_input_file("faults/long/manifest.json") as f:
        encode = json.loads(f.read())["stages"]["encode"]
    assert (encode["n_shards_skipped"], encode["n_shards_encoded"]) == (len(committed), 30 - len(committed))
    assert_committed_results_equal(fs, "faults/long", uninterrupted)
