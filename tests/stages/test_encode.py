"""The encoder against a dense reference, and the feature store's resume, on a
real local Ray cluster with a tiny Llama and a tiny sae-lens TopK SAE built from config."""

import json
import logging
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from raysel.config import ConfigError, RunConfig
from raysel.core.encoder import Encoder
from raysel.core.features import FeatureStore
from raysel.core.models import truncate_to_layer
from raysel.core.paths import FEATURES_DONE
from raysel.core.sae import sae_metadata
from raysel.core.spans import TopSpans
from raysel.core.storage import Storage
from tests.conftest import CLI_ENV, DEMO, build_tiny_sae, cli_command, encode, interruptible_cfg, prepare, run_cfg

TEXTS = [
    "<|user|>Name a prime number.\n<|assistant|>Seven is prime.\n",
    "<|user|>Write a long answer about the sea and the sky and the land and all of it.\n<|assistant|>Fine.\n",
    "Plain text that does not start with the template prefix.",
    "x",
]


def encoder_stack(model_dir, sae_dir, **encode):
    return RunConfig.model_validate(
        {
            "input": {"paths": ["unused"]},
            "model": {"name": str(model_dir), "dtype": "float32"},
            "sae": {"path": str(sae_dir)},
            "encode": {"tokens_per_batch": 64, **encode},
        }
    ).stack()


def test_truncated_model_equals_the_full_models_hidden_state(tiny_model_dir):
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tok(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = full(**batch, output_hidden_states=True).hidden_states[2]  # after block 1
        truncated = truncate_to_layer(full, 1)(**batch, use_cache=False).last_hidden_state
    assert len(truncated_layers := full.model.layers) == 2, truncated_layers
    assert torch.equal(truncated, reference)


def dense_reference(model_dir, sae_dir, texts, skip_prefix_ids, hidden_index=2):
    """Full model, output_hidden_states, one sample at a time, dense SAE encode."""
    from sae_lens import SAE

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    sae = SAE.load_from_disk(sae_dir)
    out = []
    for text in texts:
        ids = tok(text)["input_ids"]
        k = len(skip_prefix_ids)
        start = k if k and ids[:k] == skip_prefix_ids else 1
        with torch.no_grad():
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[hidden_index][0, start:]
            z = sae.encode(h)
        out.append((z.shape[0], z.max(0).values if len(z) else None, z.sum(0) if len(z) else None))
    return out


@pytest.mark.parametrize("skip_prefix", [True, False])
def test_encoder_matches_a_dense_reference(tiny_model_dir, tiny_sae_dir, skip_prefix):
    encoder = Encoder(encoder_stack(tiny_model_dir, tiny_sae_dir, skip_prefix=skip_prefix))
    assert encoder.layer == 1 and bool(encoder.prefix_ids) == skip_prefix
    table = encoder(["a", "b", "c", "d"], TEXTS)
    assert table["id"].to_pylist() == ["a", "b", "c", "d"]  # input order, whatever the buckets
    reference = dense_reference(tiny_model_dir, tiny_sae_dir, TEXTS, encoder.prefix_ids)
    for row, (n, ref_max, ref_sum) in zip(table.to_pylist(), reference):
        assert row["n_tokens"] == n
        if n == 0:
            assert row["feat_ids"] == []
            continue
        ids = ref_max.nonzero().flatten().tolist()
        assert row["feat_ids"] == ids and ids == sorted(ids)
        np.testing.assert_allclose(row["feat_max"], ref_max[ids].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(row["feat_sum"], ref_sum[ids].numpy(), rtol=1e-4, atol=1e-4)


def test_a_samples_own_system_turn_is_skipped_with_the_templates_scaffolding(tiny_model_dir, tiny_sae_dir):
    """Catches pooling a sample's own system prompt and role headers: such a sample does not start
    with the template's shared prefix, so that skip alone pooled it from position 1."""
    from raysel.core.models import tokenize
    from raysel.core.records import chat_template_for

    turns = [("system", "Answer as a pirate would."), ("user", "Name a prime number."), ("assistant", "Seven.")]
    for skip in (True, False):
        encoder = Encoder(encoder_stack(tiny_model_dir, tiny_sae_dir, skip_prefix=skip))
        text = encoder.tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in turns], tokenize=False,
            chat_template=chat_template_for(encoder.tokenizer, "auto"),
        )  # fmt: skip
        ids = tokenize(encoder.tokenizer, [text])["input_ids"][0]
        first = len(ids) - encoder(["own"], [text])["n_tokens"].to_pylist()[0]
        pooled = encoder.tokenizer.decode(ids[first:])
        assert pooled.startswith("Name a prime number.") if skip else first == 1, (skip, pooled)


def renamed_sae(tiny_sae_dir, out, hook_name: str):
    shutil.copytree(tiny_sae_dir, out)
    cfg = json.loads((out / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = hook_name
    (out / "cfg.json").write_text(json.dumps(cfg))
    return out


# hook name -> the model's hidden_states index it names (0: the embeddings; L + 1: the output of block L)
HOOKS = {
    "model.layers.1": 2,  # an HF module path, as sae-lens writes for HF models
    "layers.1": 2,  # a sparsify hookpoint
    "blocks.1.hook_resid_post": 2,  # TransformerLens: the output of block 1
    "blocks.2.hook_resid_pre": 2,  # TransformerLens: the input of block 2, the same point
    "blocks.0.hook_resid_pre": 0,  # the input of block 0: the embeddings
    "blocks.2.hook_resid_post": 3,  # another block (not the last: HF's last hidden state is after the final norm)
}


@pytest.mark.parametrize("hook", HOOKS)
def test_each_hook_form_reads_the_point_of_the_residual_stream_it_names(tiny_model_dir, tiny_sae_dir, tmp_path, hook):
    sae = renamed_sae(tiny_sae_dir, tmp_path / "sae", hook)
    encoder = Encoder(encoder_stack(tiny_model_dir, sae, skip_prefix=False))
    table = encoder(["a", "b"], TEXTS[:2]).to_pylist()
    reference = dense_reference(tiny_model_dir, sae, TEXTS[:2], [], hidden_index=HOOKS[hook])
    for row, (n, ref_max, _) in zip(table, reference, strict=True):
        ids = ref_max.nonzero().flatten().tolist()
        assert row["n_tokens"] == n and row["feat_ids"] == ids and ids
        np.testing.assert_allclose(row["feat_max"], ref_max[ids].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hook", ["blocks.1.attn.hook_z", "blocks.1.hook_mlp_out", "model.layers.1.mlp", None])
def test_a_hook_that_is_not_a_residual_stream_point_is_a_config_error(tiny_model_dir, tiny_sae_dir, tmp_path, hook):
    sae = renamed_sae(tiny_sae_dir, tmp_path / "sae", hook)
    with pytest.raises(ConfigError, match="supported: model.layers.L, layers.L, blocks.L.hook_resid_post"):
        sae_metadata(encoder_stack(tiny_model_dir, sae))


def test_pooling_over_token_chunks_equals_pooling_the_whole_batch(tiny_model_dir, tiny_sae_dir, monkeypatch):
    import raysel.core.encoder as encoder_module

    encoder = Encoder(encoder_stack(tiny_model_dir, tiny_sae_dir, tokens_per_batch=4096))
    whole = encoder(["a", "b", "c", "d"], TEXTS).to_pylist()
    monkeypatch.setattr(encoder_module, "CHUNK_BYTES", 128 * 4 * 3)  # 3 tokens a chunk: chunks cut samples
    chunked = encoder(["a", "b", "c", "d"], TEXTS).to_pylist()
    assert [r["feat_ids"] for r in chunked] == [r["feat_ids"] for r in whole] and whole[1]["feat_ids"]
    for c, w in zip(chunked, whole):
        np.testing.assert_allclose(c["feat_max"], w["feat_max"], rtol=1e-6)
        np.testing.assert_allclose(c["feat_sum"], w["feat_sum"], rtol=1e-5)


def test_top_m_keeps_the_strongest_features_and_only_their_spans(tiny_model_dir, tiny_sae_dir):
    full = Encoder(encoder_stack(tiny_model_dir, tiny_sae_dir))(["b"], [TEXTS[1]]).to_pylist()[0]
    spans = TopSpans()
    capped = Encoder(encoder_stack(tiny_model_dir, tiny_sae_dir, top_m=5))(["b"], [TEXTS[1]], spans).to_pylist()[0]
    strongest = sorted(sorted(zip(full["feat_max"], full["feat_ids"]), reverse=True)[:5], key=lambda p: p[1])
    assert capped["feat_ids"] == [i for _, i in strongest] and len(full["feat_ids"]) > 5
    # a feature top_m dropped has no span there: its span would name a max the store does not hold
    assert spans.table().sort_by("feature")["value"].to_pylist() == pytest.approx(capped["feat_max"])


def test_the_encoder_reports_each_batch_so_a_long_shard_shows_progress(tiny_model_dir, tiny_sae_dir):
    """Would catch: progress that only moves when a whole shard ends (minutes on a CPU)."""
    seen = []
    Encoder(encoder_stack(tiny_model_dir, tiny_sae_dir))(["a", "b", "c", "d"], TEXTS, on_batch=seen.append)
    assert sum(seen) == 4 and len(seen) > 1


def test_sae_width_mismatch_is_a_config_error_before_work(ray_cluster, tiny_model_dir, tmp_path):
    sae = build_tiny_sae(tmp_path / "wide-sae", d_in=32)
    cfg = RunConfig.model_validate(
        {
            "input": {"paths": [str(DEMO)]},
            "model": {"name": str(tiny_model_dir), "dtype": "float32"},
            "sae": {"path": str(sae)},
            "output": {"root": str(tmp_path / "out")},
        }
    )
    with pytest.raises(ConfigError, match=r"d_in\) but model .* has hidden size 64"):
        encode(cfg, Storage(cfg.output.root, cfg.s3), {"fingerprint": "x"})
    assert not (tmp_path / "out" / "features").exists()


@pytest.mark.parametrize("kind", ["pickle named safetensors", "pickled weights file", "path to a .pt file"])
def test_an_sae_that_is_not_safetensors_is_refused_before_work(tiny_sae_dir, tmp_path, kind):
    sae = tmp_path / "sae"
    shutil.copytree(tiny_sae_dir, sae)
    # copies: load_file maps the file, which is overwritten below
    tensors = {k: v.clone() for k, v in load_file(sae / "sae_weights.safetensors").items()}
    if kind == "pickle named safetensors":
        torch.save(tensors, sae / "sae_weights.safetensors")
        path, match = sae, "is not a safetensors file"
    else:
        (sae / "sae_weights.safetensors").unlink()
        torch.save(tensors, sae / "sae_weights.pt")
        path, match = (sae if kind == "pickled weights file" else sae / "sae_weights.pt"), "safetensors only"
    cfg = RunConfig.model_validate({"input": {"paths": [str(DEMO)]}, "sae": {"path": str(path)}})
    with pytest.raises(ConfigError, match=match):
        sae_metadata(cfg.stack())


def test_feature_store_holds_every_valid_id_once(ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path):
    cfg = RunConfig.model_validate(run_cfg(tmp_path, tiny_model_dir, tiny_sae_dir, 40))
    storage = Storage(cfg.output.root, cfg.s3)
    prepared = prepare(cfg, storage)
    summary = encode(cfg, storage, prepared)
    assert summary["n_shards"] == summary["n_shards_encoded"] == 5
    features = FeatureStore(storage).dataset().to_pandas()
    prepared_ids = pq.read_table(tmp_path / "out" / "prepared", columns=["id"])["id"].to_pylist()
    assert sorted(features["id"]) == sorted(prepared_ids) and len(set(prepared_ids)) == 40
    assert summary["n_encoded"] == 40 and summary["n_tokens"] == features["n_tokens"].sum()
    assert all(len(i) == len(m) == len(s) for i, m, s in zip(features.feat_ids, features.feat_max, features.feat_sum))
    assert encode(cfg, storage, prepared) == summary  # the stage's marker holds its key: skipped whole
    (tmp_path / "out" / "stages" / "encode.json").unlink()  # as a crash after the last shard leaves it
    again = encode(cfg, storage, prepared)
    assert (again["n_shards_encoded"], again["n_shards_skipped"]) == (0, 5)  # every shard marker holds


def settled_markers(done_dir, quiet: float = 3.0) -> dict[str, str]:
    """The markers once nothing has written one for `quiet` seconds: workers the kill orphaned
    can finish the shard in hand before they notice their raylet is gone."""
    seen, since = None, time.time()
    while time.time() - since < quiet:
        now = {p.name: p.read_text() for p in done_dir.glob("*.json")}
        if now != seen:
            seen, since = now, time.time()
        time.sleep(0.2)
    return seen


def table_by_id(path) -> list[dict]:
    return pq.read_table(path).sort_by("id").to_pylist()


@pytest.mark.integration
def test_a_run_whose_driver_is_killed_resumes_to_the_uninterrupted_result(
    tiny_model_dir, tiny_sae_dir, tmp_path, uninterrupted
):
    raw = interruptible_cfg(tmp_path, tiny_model_dir, tiny_sae_dir, str(tmp_path / "out"))
    done_dir = tmp_path / "out" / FEATURES_DONE
    cmd = cli_command(tmp_path, raw)
    log = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen(cmd, env=CLI_ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(done_dir.glob("*.json"))) < 3 and first.poll() is None:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the driver, its local cluster and its actors, mid-encode
    first.wait()
    log.close()
    finished = settled_markers(done_dir)
    assert 3 <= len(finished) < 30, (tmp_path / "first.log").read_text()[-3000:]
    assert not (tmp_path / "out" / "manifest.json").exists()

    second = subprocess.run(cmd, env=CLI_ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    encode = manifest["stages"]["encode"]
    assert encode["n_shards_skipped"] == len(finished)
    assert encode["n_shards_encoded"] == encode["n_shards"] - len(finished)
    assert {p.name: p.read_text() for p in done_dir.glob("*.json") if p.name in finished} == finished
    ids = pq.read_table(tmp_path / "out" / "features")["id"].to_pylist()
    prepared_ids = pq.read_table(tmp_path / "out" / "prepared", columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 240 and sorted(ids) == sorted(prepared_ids)

    assert table_by_id(tmp_path / "out" / "features") == table_by_id(uninterrupted / "features")
    stats = [pq.read_table(root / "stats" / "features.parquet") for root in (tmp_path / "out", uninterrupted)]
    assert stats[0].equals(stats[1])
    for method in ("coverage", "random", "longest"):
        resumed, clean = (
            pq.read_table(root / "selection" / method / "data/train-00000-of-00001.parquet")
            for root in (tmp_path / "out", uninterrupted)
        )
        assert resumed.equals(clean) and resumed.num_rows == 24


def test_a_sample_the_model_cannot_take_is_an_encode_error_and_the_shard_goes_on(
    ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path, caplog
):
    # A tokenizer with a token the model's embedding lacks, as when a user's tokenizer gained tokens
    # its model never saw: only the samples that hold it fail, each on its own.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_tokens(["<unseen>"])
    tok.save_pretrained(model_dir)
    raw = run_cfg(tmp_path, model_dir, tiny_sae_dir, 24)
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:24]]
    poisoned = {rows[i]["id"] for i in (2, 9, 10)}
    for r in rows:
        if r["id"] in poisoned:
            r["instruction"] = "<unseen> " + r["instruction"]  # early: prepare cuts long samples
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig.model_validate(raw)
    storage = Storage(cfg.output.root, cfg.s3)
    with caplog.at_level(logging.INFO, logger="raysel"):
        summary = encode(cfg, storage, prepare(cfg, storage))

    assert (summary["n_encoded"], summary["n_encode_rejected"]) == (21, 3)
    # the driver's progress line counts every sample a shard took, encoded or rejected
    assert any(m.startswith("encode: shards 3/3, samples 24/24,") for m in caplog.messages), caplog.messages
    rejects = [json.loads(line) for f in sorted((tmp_path / "out" / "rejects").glob("encode-*.jsonl"))
               for line in f.read_text().splitlines()]  # fmt: skip
    assert sorted(json.loads(r["raw"])["id"] for r in rejects) == sorted(poisoned)
    assert {r["reason"] for r in rejects} == {"encode_error"} and "outside the model's embedding" in rejects[0][
        "detail"
    ]
    assert sorted(r["row"] for r in rejects) == [3, 10, 11]
    store = pq.read_table(tmp_path / "out" / "features", columns=["id"])["id"].to_pylist()
    assert sorted(store) == sorted(r["id"] for r in rows if r["id"] not in poisoned)
    # the clean samples' features are what they would be in a run without the poisoned rows
    alone = Encoder(encoder_stack(model_dir, tiny_sae_dir, tokens_per_batch=256))
    prepared = pq.read_table(tmp_path / "out" / "prepared").to_pylist()
    clean = [r for r in prepared if r["id"] not in poisoned][:4]
    expected = alone([r["id"] for r in clean], [r["text"] for r in clean]).to_pylist()
    got = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "features").to_pylist()}
    for e in expected:
        assert got[e["id"]]["feat_ids"] == e["feat_ids"]
        np.testing.assert_allclose(got[e["id"]]["feat_max"], e["feat_max"], rtol=1e-4)


def test_the_encode_fingerprint_follows_the_sae_weights_and_the_config_never_the_machine(
    tiny_model_dir, tiny_sae_dir, tmp_path
):
    """The bugs: an SAE retrained in place kept its features; and the dtype came from the driver's CPU
    flags and the GPUs the cluster showed at that instant, so a retry before the GPU workers joined
    encoded in fp32 and a head of another CPU kind changed the fingerprint. No Ray runs here: the
    fingerprint and the resources come from the config alone."""
    from safetensors.torch import save_file

    from raysel.stages.encode import Encode

    sae = tmp_path / "sae"
    shutil.copytree(tiny_sae_dir, sae)
    storage = Storage(str(tmp_path / "out"), RunConfig.model_validate({"input": {"paths": ["-"]}}).s3)

    def encode_stage(encode=None, **model):
        stack = encoder_stack(tiny_model_dir, sae)
        update = {"model": stack.model.model_copy(update=model)}
        if encode:
            update["encode"] = stack.encode.model_validate(stack.encode.model_dump() | encode)
        return Encode(stack.model_copy(update=update), storage)

    prepared = {"fingerprint": "p"}
    before = encode_stage(dtype="auto").fingerprint(prepared)
    weights = load_file(sae / "sae_weights.safetensors")
    weights["W_enc"] = weights["W_enc"] * 1.5  # retrained in place: same path, same size
    save_file(weights, sae / "sae_weights.safetensors")
    after = encode_stage(dtype="auto")
    assert after.fingerprint(prepared) != before
    assert after.parts(prepared)["dtype"] == "auto on cpu"
    assert encode_stage(dtype="float32").fingerprint(prepared) != after.fingerprint(prepared)
    on_gpus = encode_stage({"num_gpus": 1}, dtype="auto")
    assert on_gpus.parts(prepared)["dtype"] == "auto on cuda" and on_gpus.resources().num_gpus == 1
    assert after.resources().num_gpus == 0
    with pytest.raises(ValueError, match=r"encode.device: cuda needs encode.num_gpus > 0"):
        encode_stage({"device": "cuda"})


def test_the_fit_check_records_the_saes_fit_and_stops_one_that_does_not_fit(
    ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path
):
    from sae_lens import SAE

    raw = run_cfg(tmp_path, tiny_model_dir, tiny_sae_dir, 8)  # one shard
    raw["encode"]["skip_prefix"] = False  # every position but the first is measured
    cfg = RunConfig.model_validate(raw)
    storage = Storage(cfg.output.root, cfg.s3)
    prepared = prepare(cfg, storage)
    summary = encode(cfg, storage, prepared)
    # the same measure, recomputed from the full model's hidden states and sae-lens's own decode
    [measured] = [
        m for m in (tmp_path / "out" / "features" / "_done").glob("*.json") if "fit" in json.loads(m.read_text())
    ]
    shard = measured.name.removesuffix(".json")  # the one actor's first shard
    texts = pq.read_table(tmp_path / "out" / "prepared" / shard)["text"].to_pylist()[:32]
    model, tok = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    sae = SAE.load_from_disk(tiny_sae_dir)
    with torch.no_grad():
        h = torch.cat([model(torch.tensor([tok(t)["input_ids"]]), output_hidden_states=True).hidden_states[2][0, 1:]
                       for t in texts])  # fmt: skip
        ev = 1 - (h - sae.decode(sae.encode(h))).pow(2).sum() / (h - h.mean(0)).pow(2).sum()
    assert summary["fit"]["tokens"] == h.shape[0] and summary["fit"]["l0"] == 8
    assert summary["fit"]["explained_variance"] == pytest.approx(float(ev), abs=1e-3)

    bad = tmp_path / "bad-sae"
    shutil.copytree(tiny_sae_dir, bad)
    weights = load_file(bad / "sae_weights.safetensors")
    weights["W_dec"] = weights["W_dec"] * 20  # reconstructions far off: worse than the mean
    from safetensors.torch import save_file

    save_file(weights, bad / "sae_weights.safetensors")
    stopped = RunConfig.model_validate({**raw, "sae": {"path": str(bad)}})
    with pytest.raises(ConfigError, match=r"sae: explained variance -\d.* at layer 1 .* sae.allow_poor_fit"):
        encode(stopped, storage, prepared, force=True)  # the same prepared store: only the SAE differs
    allowed = RunConfig.model_validate({**raw, "sae": {"path": str(bad), "allow_poor_fit": True}})
    assert encode(allowed, storage, prepared)["fit"]["explained_variance"] < 0


def test_a_store_of_another_dtype_is_refused_untouched_and_redone_only_with_force(
    ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path
):
    """The bug: a fingerprint change removed features/ and re-encoded everything, silently: GPU-hours
    thrown away by a retry that resolved another dtype. Through pipeline.run, as the CLI calls it."""
    from raysel.pipeline import run

    raw = run_cfg(tmp_path, tiny_model_dir, tiny_sae_dir, 8)  # one shard
    first = run(RunConfig.model_validate(raw), until="encode")["stages"]["encode"]
    shard = next((tmp_path / "out" / "features").glob("*.parquet"))
    written = shard.stat().st_mtime_ns
    bf16 = RunConfig.model_validate(raw | {"model": raw["model"] | {"dtype": "bfloat16"}})
    with pytest.raises(ConfigError) as err:
        run(bf16, until="encode")
    assert "under another dtype than this run's; nothing was removed" in str(err.value)
    assert "output.root" in str(err.value) and "--force" in str(err.value)
    assert shard.stat().st_mtime_ns == written and first["dtype"] == "float32"
    redone = run(bf16, until="encode", force=True)["stages"]["encode"]
    assert redone["dtype"] == "bfloat16" and redone["n_shards_encoded"] == 1
    assert redone["fingerprint"] != first["fingerprint"]


def test_an_actor_that_resolves_another_dtype_than_the_stores_shards_encodes_nothing(
    ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path
):
    """The bug it guards: `auto` resolves on each actor, so a CPU of another kind (bf16 native or not)
    would add shards in another dtype to the store. Such an actor refuses every shard it is given."""
    import pyarrow as pa

    from raysel.stages.encode import EncodeJob, EncodeShards

    def job(root, dtype):
        return EncodeJob(str(root), {"fingerprint": "f"}, {}, dtype, ("part-0.parquet",), ("part-0.parquet",), 8)

    stack = encoder_stack(tiny_model_dir, tiny_sae_dir)  # float32 here
    # two stores in one pass (side sets encoded together): each store's own dtype decides
    actor = EncodeShards(stack, [job(tmp_path / "out", "bfloat16"), job(tmp_path / "other", "float32")])
    [row] = actor(pa.table({"job": [0], "shard": ["part-0.parquet"]})).to_pylist()
    assert row["rows"] == 0 and "runs the model in float32, the store's shards were encoded in bfloat16" in row["error"]
    assert not (tmp_path / "out").exists()
    assert actor.refusal(actor.jobs[1]) is None
