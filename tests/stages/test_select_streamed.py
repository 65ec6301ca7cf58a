"""The streamed select stage against the driver-side implementation it replaced, on a store of a few
thousand rows written in the real layout: tau from two histogram passes, the activated sets cut per
block on the cluster and merged here, the statistics, and every method's picks must equal what the
whole store read on one process gives (the old code path, kept here as the reference)."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from raysel.config import RunConfig
from raysel.core import paths
from raysel.core.features import (
    FEATURE_SCHEMA,
    LOW_BITS,
    FeatureStore,
    activated_entries,
    calibrate_tau,
    low_histogram,
    ordered_bits,
    seeded_hash,
    tau_block,
    tau_merge,
)
from raysel.core.storage import Storage
from raysel.methods.coverage_kernel import seeded_coverage
from raysel.methods.simscale_kernel import simscale
from raysel.pipeline import run
from raysel.stages.encode import Encode
from raysel.stages.prepare import PREPARED_SCHEMA, Prepare
from tests.conftest import run_cfg, write_jsonl

N, D_SAE, SHARDS = 3000, 128, 6  # the tiny SAE's width


def write_store(cfg: RunConfig, rng) -> None:
    """Prepared and feature shards of N synthetic rows, ids shuffled across shards (so shard order is
    not id order), committed under the fingerprints the real stages compute."""
    storage = Storage(cfg.output.root, cfg.s3)
    prepare = Prepare(cfg.input, cfg.prepare, cfg.model, cfg.s3, storage)
    summary = {"n_input": N, "n_blank_lines": 0, "n_valid": N, "n_rejected": 0, "rejected_by_reason": {},
               "fingerprint": prepare.fingerprint, "files": [f.path for f in prepare.files]}  # fmt: skip
    encode = Encode(cfg.stack(), storage)
    popularity = 1.0 / np.arange(1, D_SAE + 1)
    ids = np.array([f"r{i:05d}" for i in rng.permutation(N)], dtype=object)
    for s, part in enumerate(np.array_split(np.arange(N), SHARDS)):
        sizes = rng.integers(0, 40, part.size)  # some rows store nothing
        feats = [np.sort(rng.choice(D_SAE, k, replace=False, p=popularity / popularity.sum())) for k in sizes]
        values = [rng.lognormal(0, 1, k).astype(np.float32) for k in sizes]
        n_tokens = rng.integers(8, 200, part.size).astype(np.int32)
        name = f"part-{s:05d}.parquet"
        table = pa.table({
            "id": ids[part].tolist(), "n_tokens": n_tokens,
            "feat_ids": pa.array([f.tolist() for f in feats], pa.list_(pa.int32())),
            "feat_max": pa.array([v.tolist() for v in values], pa.list_(pa.float32())),
            "feat_sum": pa.array([(v * 3).tolist() for v in values], pa.list_(pa.float32())),
        }, schema=FEATURE_SCHEMA)  # fmt: skip
        storage.fs.create_dir(storage.path(paths.FEATURES), recursive=True)
        pq.write_table(table, storage.path(paths.FEATURES, name))
        storage.write_json(paths.shard_marker(name), {"rows": part.size, "tokens": int(n_tokens.sum()),
                                                      "key": {"fingerprint": encode.fingerprint(summary)}})  # fmt: skip
        records = [json.dumps({"id": i, "text": f"sample {i}"}) for i in ids[part]]
        prepared = pa.table({
            "id": ids[part].tolist(), "shape": ["text"] * part.size,
            "messages": pa.nulls(part.size, PREPARED_SCHEMA.field("messages").type),
            "text": [f"sample {i}" for i in ids[part]], "n_tokens": n_tokens, "n_tokens_full": n_tokens,
            "truncated": np.zeros(part.size, bool), "n_response_tokens": rng.integers(0, 100, part.size).astype(np.int32),
            "content_hash": ids[part].tolist(), "source": ["synthetic"] * part.size,
            "row": part.astype(np.int64), "record": records,
        }, schema=PREPARED_SCHEMA)  # fmt: skip
        storage.fs.create_dir(storage.path(paths.PREPARED), recursive=True)
        pq.write_table(prepared, storage.path(paths.PREPARED, name))
    storage.write_json(paths.marker("prepare"), {**summary, "key": prepare.key({})})


def reference(root) -> dict:
    """The old driver-side path: the whole store on one process, sorted by id."""
    table = pq.read_table(root / "features").sort_by("id")
    flat = pc.list_flatten(table["feat_max"]).to_numpy()
    tau = calibrate_tau(flat, table.num_rows, 8)
    rows, feats, _ = activated_entries(table, tau)
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=table.num_rows))]
    prepared = pq.read_table(root / "prepared", columns=["id", "n_response_tokens"])
    tokens = dict(zip(prepared["id"].to_pylist(), prepared["n_response_tokens"].to_pylist()))
    ids = np.asarray(table["id"].to_pylist(), dtype=object)
    k = N // 10
    tie = seeded_hash(ids, 0)  # select.seed: equal lengths and set sizes go by the ids' seeded hash
    longest = np.lexsort((tie, -np.array([tokens[i] for i in ids])))[:k]
    return {
        "tau": tau,
        "doc_freq": np.bincount(feats, minlength=D_SAE),
        "coverage": ids[seeded_coverage(ids, indptr, feats, k, seed=0).order].tolist(),
        "simscale": ids[simscale(indptr, feats, k, tie=tie).order].tolist(),
        "random": ids[np.random.default_rng(0).permutation(N)[:k]].tolist(),
        "longest": ids[longest].tolist(),
    }


def test_the_streamed_select_stage_picks_what_the_whole_store_on_the_driver_picks(
    ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path, caplog
):
    """Catches a CSR gathered out of id order, a tau histogram off by one rank, a block merged twice or
    dropped, a pool whose response lengths are joined to the wrong ids, and a stats pass that tells the
    user nothing of where it stands."""
    caplog.set_level(logging.INFO, logger="raysel")
    raw = run_cfg(tmp_path, tiny_model_dir, tiny_sae_dir, 1)
    raw["input"]["paths"] = [str(write_jsonl(tmp_path / "input.jsonl", [{"id": "x", "text": "placeholder"}]))]
    raw["activation"] = {"target_active": 8}
    raw["select"] = {"budget": 0.1, "methods": ["coverage", "simscale", "random", "longest"]}
    cfg = RunConfig.model_validate(raw)
    write_store(cfg, np.random.default_rng(7))
    manifest = run(cfg, until="select")
    assert manifest["stages"]["encode"]["n_shards_encoded"] == 0  # the store was used as written
    root, want = tmp_path / "out", reference(tmp_path / "out")
    assert manifest["stages"]["tau"]["tau"] == want["tau"] and manifest["stages"]["stats"]["tau"] == want["tau"]
    assert manifest["stages"]["tau"]["calibrated_on"] == N  # under activation.calibrate_rows: every sample
    stats = pq.read_table(root / "stats" / "features.parquet")
    assert np.array_equal(stats["doc_freq"].to_numpy(), want["doc_freq"])
    assert manifest["stages"]["stats"]["n_activated"] == want["doc_freq"].sum() == pytest.approx(8 * N, abs=N // 100)
    for method in ("coverage", "simscale", "random", "longest"):
        picked = pq.read_table(root / "selection" / method / "selected.parquet")["id"].to_pylist()
        assert len(picked) == N // 10 and picked == want[method], method
    assert f"stats: shards {SHARDS}/{SHARDS}, samples {N:,}/{N:,}" in caplog.text


def test_a_sampled_tau_is_the_exact_tau_of_evenly_spaced_whole_shards(
    ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path
):
    """Catches a rank taken from the whole store's row count while the values come from the sample (tau
    far too low: about three times the target active), shards sampled from one end of the store, and a
    sample that drops the shards' ends or reads a shard twice."""
    cfg = RunConfig.model_validate(run_cfg(tmp_path, tiny_model_dir, tiny_sae_dir, 1))
    write_store(cfg, np.random.default_rng(11))
    store = FeatureStore(Storage(cfg.output.root, cfg.s3))
    found = store.calibrate(8, sample_rows=N // 3)  # every 3rd of the 6 shards, from the middle of each step
    sample = [pq.read_table(tmp_path / "out" / "features" / f"part-{s:05d}.parquet") for s in (1, 4)]
    flat = np.concatenate([pc.list_flatten(t["feat_max"]).to_numpy() for t in sample])
    assert found == {"tau": calibrate_tau(flat, sum(t.num_rows for t in sample), 8), "calibrated_on": N // 3, "of": N}
    whole = pc.list_flatten(pq.read_table(tmp_path / "out" / "features")["feat_max"]).to_numpy()
    assert found["tau"] != calibrate_tau(whole, N, 8)  # the sample's own value, not the whole store's
    assert np.count_nonzero(whole > found["tau"]) / N == pytest.approx(8, rel=0.1)
    assert store.calibrate(8, sample_rows=N)["tau"] == calibrate_tau(whole, N, 8) == store.calibrate(8)["tau"]


def test_tau_takes_one_pass_only_when_every_block_sent_the_bin_it_fell_in():
    """Catches a one-pass tau that sums low histograms some blocks never sent (tau off by their values),
    and a second pass that never runs. Blocks alike: every block bets on tau's bin, and its low histogram
    is exact. Blocks a thousand times apart: the low block's own quantile lies far below the store's."""
    rng = np.random.default_rng(3)

    def table(scale: float) -> pa.Table:
        values = (rng.lognormal(0, 1, (500, 20)) * scale).astype(np.float32)
        return pa.table({"feat_max": pa.array(list(values), pa.list_(pa.float32()))})

    for scales, one_pass in (((1.0, 1.0, 1.0), True), ((1.0, 1000.0), False)):
        blocks = [table(s) for s in scales]
        flat = np.concatenate([pc.list_flatten(b["feat_max"]).to_numpy() for b in blocks])
        rank = int(0.4 * flat.size)  # tau: the (rank + 1)-th largest
        high, above, low = tau_merge([tau_block(b, rank / flat.size) for b in blocks], rank)
        assert (low is not None) == one_pass
        keys = ordered_bits(flat)
        want = int(ordered_bits(np.array([calibrate_tau(flat, flat.size, 0.4)]))[0])
        assert high == want >> LOW_BITS and above == np.count_nonzero(keys >> LOW_BITS > high)
        if one_pass:
            assert np.array_equal(low, low_histogram(flat, high))
