"""Multi-node runs on real raylets (ray.cluster_utils.Cluster, all on this machine): the encode
actors spread over the worker nodes, and a worker node lost mid-encode costs nothing.

The driver is a `raysel run` process joined to the cluster, as under `ray job submit`."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq
import pytest
import yaml
from ray.cluster_utils import Cluster

from raysel.core.paths import FEATURES_DONE as DONE
from tests.conftest import run_cfg

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster():
    temp = tempfile.mkdtemp(prefix="rs-cl-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # the head runs Ray Data's small tasks; only worker nodes offer `encoder`, so the model actors go there
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp, "include_dashboard": False})
    try:
        yield c
    finally:
        c.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def add_worker(cluster: Cluster):
    return cluster.add_node(num_cpus=2, resources={"encoder": 1})


def start_run(tmp_path, cluster: Cluster, model_sae: tuple, rows: int, tokens_per_batch: int) -> subprocess.Popen:
    raw = run_cfg(tmp_path, *model_sae, rows)
    raw["encode"] |= {"actors": 2, "resources": {"encoder": 1}, "memory_gb": 0.5, "tokens_per_batch": tokens_per_batch}
    raw["ray"] = {"address": cluster.address}
    raw["output"]["report"] = False
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "driver.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "raysel.cli", "run", str(tmp_path / "run.yaml")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(driver: subprocess.Popen, tmp_path, timeout: float = 600) -> dict:
    try:
        driver.wait(timeout=timeout)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
    assert driver.returncode == 0, (tmp_path / "driver.log").read_text()[-4000:]
    return json.loads((tmp_path / "out" / "manifest.json").read_text())


def markers(tmp_path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in (tmp_path / "out" / DONE).glob("*.json")}


def assert_every_valid_id_once(tmp_path, n: int):
    ids = pq.read_table(tmp_path / "out" / "features", columns=["id"])["id"].to_pylist()
    prepared = pq.read_table(tmp_path / "out" / "prepared", columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == n and sorted(ids) == sorted(prepared)


@pytest.fixture
def tiny(tiny_model_dir, tiny_sae_dir):
    return tiny_model_dir, tiny_sae_dir


def test_encode_runs_on_both_worker_nodes(cluster, tiny, tmp_path):
    nodes = {add_worker(cluster).node_id, add_worker(cluster).node_id}
    # ~20 small shards: an actor that starts seconds after the other (a cold worker node) still finds work
    manifest = finish(start_run(tmp_path, cluster, tiny, rows=160, tokens_per_batch=96), tmp_path)
    ran_on = {m["node"] for m in markers(tmp_path).values()}
    assert ran_on == nodes, "each worker node's actor should have encoded shards"
    assert manifest["counts"]["n_encoded"] == 160 and manifest["stages"]["select"]["methods"]["coverage"] > 0
    assert_every_valid_id_once(tmp_path, 160)


def test_a_worker_node_lost_mid_encode_loses_and_duplicates_nothing(cluster, tiny, tmp_path):
    keep, lose = add_worker(cluster), add_worker(cluster)
    driver = start_run(tmp_path, cluster, tiny, rows=240, tokens_per_batch=96)  # 30 shards that take a while
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        done = markers(tmp_path)
        if any(m["node"] == lose.node_id for m in done.values()):
            break
        time.sleep(0.05)
    before = len(done)
    cluster.remove_node(lose, allow_graceful=False)  # the raylet and every worker on it, at once
    assert before < 30, "the node should go while shards remain"
    manifest = finish(driver, tmp_path)
    assert manifest["stages"]["encode"]["n_shards"] == 30 and manifest["counts"]["n_encoded"] == 240
    assert_every_valid_id_once(tmp_path, 240)
    ran_on = {m["node"] for m in markers(tmp_path).values()}
    assert keep.node_id in ran_on
