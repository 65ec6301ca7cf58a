"""`ray job submit` round trip against a real head started with `ray start` on
loopback, token auth on, running jobs/run.py with the real default model."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO, build_tiny_sae, fac_reference, free_port, write_jsonl
from tests.stages.test_prepare import GOOD, LONG

BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path):
    temp = Path(f"/tmp/rs-head-{secrets.token_hex(3)}")  # short: Ray's socket paths have a length limit
    dash = free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_ADDRESS": "",
    }
    ports = [
        "--port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--ray-client-server-port",
        "--node-manager-port",
        "--object-manager-port",
    ]
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--num-cpus=2",
        "--object-store-memory=400000000",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *(f"{flag}={free_port()}" for flag in ports),
    ]
    log = open(tmp_path / "head.log", "wb")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_jobs_api(address, env, head, tmp_path / "head.log")
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=3)  # `ray start --block` often outlives a SIGTERM by minutes: then killed
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)  # anything that left the group
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def _wait_for_jobs_api(address, env, head, log_path):
    deadline = time.time() + 120
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited: {log_path.read_text()[-3000:]}")
        probe = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, text=True
        )
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise RuntimeError("the Ray head's job API did not come up in 120 s")


def submit(address: str, env: dict, job_id: str, *entrypoint: str) -> str:
    """`ray job submit` of this repository, waiting for the end; the job's final status, or its logs."""
    done = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--submission-id",
            job_id,
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "jobs/run.py",
            *entrypoint,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    ask = f"from ray.job_submission import JobSubmissionClient as C; print(C({address!r}).get_job_status({job_id!r}).value)"
    status = subprocess.run([sys.executable, "-c", ask], env=env, capture_output=True, text=True)
    return status.stdout.strip() if status.stdout.strip() == "SUCCEEDED" else done.stdout[-4000:] + done.stderr[-4000:]


@pytest.mark.integration
def test_job_submit_round_trip(ray_head, tmp_path):
    address, env = ray_head
    data = write_jsonl(tmp_path / "corpus.jsonl", [GOOD, LONG, {"id": "bad", "instruction": 3, "output": "x"}])
    config = tmp_path / "job.yaml"
    # an SAE for SmolLM2's 576-wide residual stream after block 3, built from config
    sae = build_tiny_sae(tmp_path / "sae", d_in=576, d_sae=256, k=16, layer=3)
    config.write_text(
        yaml.safe_dump(
            {
                "input": {"paths": [str(data)], "fields": {"id": "id"}},
                "prepare": {"max_tokens": 128},
                "sae": {"path": str(sae), "allow_poor_fit": True},  # random, not trained on SmolLM2
                "output": {"root": str(tmp_path / "out")},
            }
        )
    )
    wrong = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", address],
        capture_output=True,
        text=True,
        env={**env, "RAY_AUTH_TOKEN": "0" * 64},
    )
    assert wrong.returncode != 0, "the head must refuse a client with the wrong token"

    # one job, `raysel fac`, which runs the pool's plan up to stats and encodes the anchor beside it (a
    # second job of `raysel run` cost 40 s more and reached no code this one does not: the verbs share
    # jobs/run.py and the executor)
    anchor = write_jsonl(
        tmp_path / "anchor.jsonl",
        [{"id": "q1", "instruction": "Name a prime number.", "output": "Two is the only even prime."}],
    )
    job = submit(
        address,
        env,
        f"raysel-fac-{secrets.token_hex(4)}",
        "fac",
        str(config),
        "--set",
        "prepare.dedup=true",
        "--set",
        f"fac.anchor={json.dumps([str(anchor)])}",
        "--set",
        "fac.n_features=20",
        "--set",
        f"fac.reference={json.dumps([fac_reference(tmp_path)])}",  # not the 1,000-row default: an encode of its own
    )
    assert job == "SUCCEEDED", job
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"] == {
        "n_input": 3,
        "n_blank_lines": 0,
        "n_valid": 2,
        "n_rejected": 1,
        "rejected_by_reason": {"wrong_type": 1},
        "n_encoded": 2,
        "n_encode_rejected": 0,
    }
    assert manifest["config"]["input"]["paths"] == [str(data)] and manifest["config"]["prepare"]["dedup"] is True
    assert manifest["config"]["model"]["name"] == "embedded:smollm2-135m-instruct"
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "prepared").to_pylist()}
    # rendered with SmolLM2's own chat template, and the long one cut to 128 real tokens
    assert rows["a1"]["text"].startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nName a prime number.<|im_end|>" in rows["a1"]["text"]
    assert rows["a9"]["truncated"] and rows["a9"]["n_tokens"] == 128
    features = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "features").to_pylist()}
    assert set(features) == {"a1", "a9"} and manifest["stages"]["encode"]["layer"] == 3
    # SmolLM2's 21-token system prompt and the user header are not pooled; the long one keeps the rest
    assert features["a9"]["n_tokens"] < 128 - 21 and len(features["a9"]["feat_ids"]) > 16

    assert job == "SUCCEEDED", job
    report = json.loads((tmp_path / "out" / "fac" / "report.json").read_text())
    assert report["n_anchor"] == 1 and report["n_evaluated"] == 2 and report["n_in_anchor"] > 0
    assert report["fac"] == pytest.approx(report["n_covered"] / report["n_in_anchor"])  # not merely within [0, 1]
    assert report["n_in_anchor"] == report["n_covered"] + len(report["missing"])
    assert manifest["stages"]["fac"]["fac"] == report["fac"]
