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
def cluster(monkeypatch):
    temp = tempfile.mkdtemp(prefix="rs-cl-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # the cluster's address file (which ray.init() without an address reads) goes there, not /tmp/ray
    monkeypatch.setenv("RAY_TMPDIR", temp)
    os.mkdir(f"{temp}/ray")
    # the head runs Ray Data's small tasks; only worker nodes offer `encoder`, so the model actors go there
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp, "include_dashboard": False})
    try:
        yield c
    finally:
        c.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def add_worker(cluster: Cluster):
    return cluster.add_node(num_cpus=2, resources={"encoder": 1})


def start_run(
    tmp_path, cluster: Cluster, model_sae: tuple, rows: int, tokens_per_batch: int, **encode
) -> subprocess.Popen:
    raw = run_cfg(tmp_path, *model_sae, rows)
    raw["encode"] |= {"actors": 2, "resources": {"encoder": 1}, "memory_gb": 0.5, "tokens_per_batch": tokens_per_batch}
    raw["encode"] |= encode
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


def test_encode_spreads_over_the_worker_nodes_and_one_lost_mid_encode_loses_and_duplicates_nothing(
    cluster, tiny, tmp_path
):
    """Would catch: actors that do not spread over the nodes offering `encoder` (each node's actor
    must commit shards), a shard lost or encoded twice when a node dies with its actor mid-shard, and
    a run that does not finish on the node that is left."""
    keep, lose = add_worker(cluster), add_worker(cluster)
    driver = start_run(tmp_path, cluster, tiny, rows=240, tokens_per_batch=96)  # 30 shards that take a while
    deadline, done = time.time() + 300, {}
    while time.time() < deadline and driver.poll() is None:
        done = markers(tmp_path)
        if any(m["node"] == lose.node_id for m in done.values()):
            break
        time.sleep(0.05)
    cluster.remove_node(lose, allow_graceful=False)  # the raylet and every worker on it, at once
    assert any(m["node"] == lose.node_id for m in done.values()) and len(done) < 30, (
        "the lost node's actor should have committed shards, and the node should go while shards remain"
    )
    manifest = finish(driver, tmp_path)
    assert manifest["stages"]["encode"]["n_shards"] == 30 and manifest["counts"]["n_encoded"] == 240
    assert manifest["stages"]["select"]["methods"]["coverage"] > 0
    assert_every_valid_id_once(tmp_path, 240)
    assert {m["node"] for m in markers(tmp_path).values()} == {keep.node_id, lose.node_id}


def test_a_gpu_encode_waits_for_its_gpu_node_and_never_runs_on_the_cpus(cluster, tiny, tmp_path):
    """The bug: the GPUs asked for came from what the cluster showed when the run started, so a run that
    began before its GPU workers joined (autoscaling from zero, a retried RayJob) encoded on the CPUs,
    in another dtype. Ray accepts a declared GPU on a CPU machine: the actor lands there, and stops
    because torch sees no CUDA, which shows where Ray put it."""
    add_worker(cluster)  # a CPU worker that offers `encoder`: where the old code would have encoded
    driver = start_run(tmp_path, cluster, tiny, rows=16, tokens_per_batch=96, actors=1, num_gpus=1)
    log = tmp_path / "driver.log"
    deadline = time.time() + 180
    while "to encode" not in log.read_text() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(10)  # time enough for an actor to start on the CPU worker, were it allowed to
    assert driver.poll() is None and not markers(tmp_path), log.read_text()[-3000:]
    cluster.add_node(num_cpus=2, num_gpus=1, resources={"encoder": 1})
    driver.wait(timeout=300)
    text = log.read_text()
    assert driver.returncode != 0 and not markers(tmp_path)
    assert "the config asks for CUDA but this process sees no GPU (CUDA_VISIBLE_DEVICES='0')" in text, text[-3000:]


def test_a_run_without_an_address_starts_its_own_cluster_beside_one_running_here(cluster):
    """The bug: with no ray.address, ray.init() joined the cluster left running on the machine, and the
    run died with it. `auto` is how a user asks to join that one."""
    code = (
        "import logging, sys, ray; from raysel.core.ray_adapter import RayConfig, init_ray; "
        "logging.basicConfig(level=20); init_ray(RayConfig(address=sys.argv[1] or None, num_cpus=1)); "
        "print('GCS', ray.get_runtime_context().gcs_address)"
    )

    def gcs(address: str) -> tuple[str, str]:
        env = {**os.environ, "RAY_ADDRESS": ""}  # RAY_TMPDIR: where this cluster's address file is
        done = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True,
                              timeout=180)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.split("GCS ")[-1].strip(), done.stderr

    own, log = gcs("")
    assert own != cluster.address and "ray: started a local cluster" in log
    joined, log = gcs("auto")
    assert joined == cluster.address and "ray: joined the cluster at auto (ray.address)" in log
