"""Shared fixtures and helpers, the one file every test module draws on: a real local Ray
cluster, tiny real tokenizers, models and SAEs built from config, a real SeaweedFS S3 server on
loopback (each stopped by its own handle or PID when the session ends), run configs over the
demo data, and hand-built feature-store tables."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

# Two xdist workers, their Ray workers and actors share two cores. libgomp's threads spin while they
# wait by default, burning the CPU the other processes need: two 2-thread torch processes measured
# 315 small matmuls/s each that way and 660 with passive waiting (alone, 1,165 either way). Set before
# any torch loads here, and inherited by every Ray cluster and CLI process the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "raysel" / "data" / "demo.jsonl"
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
)


# The session fixtures that cost a run each. `make test` runs two pytest-xdist workers, each with its
# own fixtures and Ray cluster; every module that names one of these goes to the same worker, which
# builds it once. Every other module is a unit of its own, so its module fixtures are built once too.
SHARED_RUNS = ("uninterrupted", "task_run", "stats_run")


def pytest_xdist_make_scheduler(config, log):
    """xdist's loadscope (a module at a time) with the modules that share a session run as one unit.
    (Not xdist_group marks: with pytest 9 they no longer reach xdist 3.8's scheduler, which reads
    them from a node id pytest now derives.)"""
    from xdist.scheduler import LoadScopeScheduling

    @functools.cache
    def unit(module: str) -> str:  # a module's source, read once, not once per test
        source = (REPO / module).read_text()
        return next((name for name in SHARED_RUNS if name in source), module)

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit(nodeid.split("::")[0])

    return SharedRunScheduling(config, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fac_reference(tmp: Path) -> str:
    """40 demo rows as FAC's reference set: the bundled 1,000 (the default) would cost each FAC test
    an encode of them."""
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[100:140]]
    return str(write_jsonl(tmp / "reference.jsonl", rows))


def write_jsonl(path: Path, lines: list) -> Path:
    """Write rows (dicts become JSON; str and bytes are written as they are)."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    temp = tempfile.mkdtemp(prefix="rs-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _build_tiny_tokenizer(out: Path, chat_template: str | None) -> Path:
    """A real byte-level BPE tokenizer trained on the demo data, small enough to build in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["output"] for line in DEMO.read_text().splitlines()[:300]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer without a chat template: samples render through the fallback."""
    return _build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tok"), None)


@pytest.fixture(scope="session")
def tiny_chat_tokenizer_dir(tmp_path_factory) -> Path:
    return _build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-chat-tok"), TINY_CHAT_TEMPLATE)


class SeaweedS3:
    """`weed mini` on 127.0.0.1 with free ports, its data and logs in a temp dir."""

    access_key = "raysel-test-key"
    secret_key = "raysel-test-secret"

    def __init__(self, root: Path):
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        self.port = free_port()
        ports = {name: free_port() for name in ("master", "volume", "filer", "admin")}
        (root / "data").mkdir()
        (root / "logs").mkdir()
        args = [
            weed,
            f"-logdir={root / 'logs'}",
            "mini",
            f"-dir={root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={free_port()}",
            f"-s3.port.iceberg={free_port()}",
            f"-s3.port.lance={free_port()}",
            f"-debug.port={free_port()}",
        ]
        for name, port in ports.items():
            args += [f"-{name}.port={port}", f"-{name}.port.grpc={free_port()}"]
        self.args, self.root = args, root
        self.start()

    def start(self) -> None:
        """Start (or start again, on the same ports and data) and wait until S3 answers."""
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self.log = open(self.root / "weed.out", "ab")
        self.proc = subprocess.Popen(
            self.args, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_ready(self.root)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def filesystem(self, secret_key: str | None = None):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=self.access_key,
            secret_key=secret_key or self.secret_key,
            endpoint_override=self.endpoint,
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )

    def config(self) -> dict:
        return {
            "endpoint_override": self.endpoint,
            "scheme": "http",
            "region": "us-east-1",
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "max_attempts": 2,
        }

    def _wait_ready(self, root: Path) -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited: {(root / 'weed.out').read_text()[-2000:]}")
            try:
                self.filesystem().create_dir("probe")
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("SeaweedFS S3 did not come up within 60 s")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_chat_tokenizer_dir) -> Path:
    """A 4-layer Llama built from config (random weights) with the tiny chat tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(tiny_chat_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny_sae(out: Path, d_in: int = 64, d_sae: int = 128, k: int = 8, layer: int = 1) -> Path:
    """A TopK SAE built from config, with random weights, saved the way sae-lens saves."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name=f"model.layers.{layer}")))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / d_in**0.5)
        sae.W_dec.copy_(sae.W_enc.T)
    sae.save_model(out)
    return out


@pytest.fixture(scope="session")
def tiny_sae_dir(tmp_path_factory) -> Path:
    return build_tiny_sae(tmp_path_factory.mktemp("tiny-sae"))


def run_cfg(tmp_path, model_dir, sae_dir, n_rows: int) -> dict:
    """A run over the first n_rows demo rows with the tiny model and SAE, small shards, output under tmp_path/out."""
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:n_rows]]
    data = write_jsonl(tmp_path / "corpus.jsonl", rows)
    return {
        "input": {"paths": [str(data)], "fields": {"id": "id"}},
        "prepare": {"max_tokens": 96, "rows_per_file": 8},
        # fp32, not auto's bf16 on a CPU that has it: the tests compare paths against fp32 references
        "model": {"name": str(model_dir), "dtype": "float32"},
        # the tiny SAE is random, not trained: the fit check would rightly find it poor on some samples
        # (its own test turns the check on with an SAE scaled out of fit)
        "sae": {"path": str(sae_dir), "allow_poor_fit": True},
        "encode": {"tokens_per_batch": 256},
        "output": {"root": str(tmp_path / "out")},
    }


def prepare(cfg, storage) -> dict:
    """The prepare stage of `cfg`'s input, committed into `storage`."""
    from raysel.stages.base import execute
    from raysel.stages.prepare import Prepare

    return execute(Prepare(cfg.input, cfg.prepare, cfg.model, cfg.s3, storage))


def encode(cfg, storage, prepared: dict, force: bool = False) -> dict:
    from raysel.stages.base import execute
    from raysel.stages.encode import Encode

    return execute(Encode(cfg.stack(), storage, force=force), {"prepare": prepared})


def store_table(rows: list[dict]):
    """A feature-store table from {id, n_tokens, feats: {feature: (max, sum)}} rows."""
    import pyarrow as pa

    return pa.table(
        {
            "id": [r["id"] for r in rows],
            "n_tokens": pa.array([r["n_tokens"] for r in rows], pa.int32()),
            "feat_ids": pa.array([sorted(r["feats"]) for r in rows], pa.list_(pa.int32())),
            "feat_max": pa.array(
                [[r["feats"][j][0] for j in sorted(r["feats"])] for r in rows], pa.list_(pa.float32())
            ),
            "feat_sum": pa.array(
                [[r["feats"][j][1] for j in sorted(r["feats"])] for r in rows], pa.list_(pa.float32())
            ),
        }
    )


@pytest.fixture(scope="session")
def task_run(ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path_factory):
    """mona, igds and coverage selected from 60 demo rows against 8 math targets (tests of both methods read it)."""
    from raysel.config import RunConfig
    from raysel.pipeline import run

    tmp = tmp_path_factory.mktemp("task")
    raw = run_cfg(tmp, tiny_model_dir, tiny_sae_dir, 60)
    raw["prepare"]["max_tokens"] = 512  # IGDS skips a held-out target that does not fit with its answer
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()]
    targets = write_jsonl(tmp / "targets.jsonl", [r for r in rows[60:] if r["category"] == "math"][:8])
    raw |= {
        "select": {
            "budget": 10,
            "methods": [
                {"name": "mona", "targets": [str(targets)]},
                # a random SAE on a random model: few features, if any, clear the null, so recall may decide
                {
                    "name": "igds",
                    "targets": [str(targets)],
                    "candidates": 6,
                    "keep": 2,
                    "budget": 0.25,
                    "actors": 2,
                    "fallback": "recall",
                },  # fmt: skip
                "coverage",
            ],
        }
    }
    manifest = run(RunConfig.model_validate(raw), until="select")
    return tmp / "out", manifest, RunConfig.model_validate(raw)


def interruptible_cfg(tmp: Path, model_dir, sae_dir, root: str, s3: dict | None = None) -> dict:
    """240 demo rows in ~30 small encode shards (a run that takes a while), no report: the run the
    fault tests interrupt."""
    raw = run_cfg(tmp, model_dir, sae_dir, 240)
    raw["encode"]["tokens_per_batch"] = 96
    raw["output"] = {"root": root, "report": False}
    return raw | ({"s3": s3} if s3 is not None else {})


def cli_command(tmp: Path, raw: dict) -> list[str]:
    """`raysel run` of `raw` in a process of its own, with its own local 2-CPU cluster."""
    (tmp / "run.yaml").write_text(yaml.safe_dump(raw))
    return [sys.executable, "-m", "raysel.cli", "run", str(tmp / "run.yaml"), "--set", "ray.num_cpus=2"]


CLI_ENV = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def uninterrupted(ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path_factory) -> Path:
    """The interruptible run to a local folder, never disturbed: what a resumed run must equal (the
    driver-kill and S3 outage tests compare with it). On this worker's cluster, through the same plan
    as `raysel run` (the interrupted runs are CLI processes with clusters of their own)."""
    from raysel.config import RunConfig
    from raysel.pipeline import run

    tmp = tmp_path_factory.mktemp("clean")
    run(RunConfig.model_validate(interruptible_cfg(tmp, tiny_model_dir, tiny_sae_dir, str(tmp / "out"))))
    return tmp / "out"


@pytest.fixture(scope="session")
def stats_run(ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path_factory):
    """40 demo rows encoded with statistics: the store the spans and FAC tests read."""
    from raysel.config import RunConfig
    from raysel.pipeline import run

    tmp = tmp_path_factory.mktemp("spans")
    raw = run_cfg(tmp, tiny_model_dir, tiny_sae_dir, 40)
    manifest = run(RunConfig.model_validate(raw), until="stats")
    return tmp / "out", RunConfig.model_validate(raw), manifest


def fac_root(stats_run, root: Path, **sections) -> tuple[dict, Path]:
    """A copy of stats_run's root (or of one in its shape, such as test_fac's fac_ready) at its own tau, its
    statistics reused, and its config: a FAC test's run without encoding the pool again."""
    src, cfg, manifest = stats_run
    if not root.exists():
        shutil.copytree(src, root)
    raw = json.loads(cfg.model_dump_json()) | {"activation": {"tau": manifest["stages"]["stats"]["tau"]}, "s3": {}}
    return raw | {"output": {"root": str(root)}} | sections, root
