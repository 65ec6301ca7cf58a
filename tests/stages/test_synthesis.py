"""FAC Synthesis with a tiny config-built generator (real `generate`, real SAE scoring), and
`raysel synthesize` end to end on a real Ray cluster."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysel.config import ConfigError, RunConfig
from raysel.core.generation import check_vllm
from raysel.core.synthesis import as_record, passing, synthesize
from raysel.pipeline import run
from tests.conftest import DEMO, build_tiny_sae, fac_reference, run_cfg, write_jsonl

PROVENANCE = ("feature", "step", "prompt", "score", "generator")


def test_the_activation_filter_rejects_candidates_at_or_below_delta():
    assert passing([0.5, 2.0, 1.5, 0.9, 1.0], delta=1.0, keep=5) == [1, 2]
    assert passing([0.5, 2.0, 1.5], delta=1.0, keep=1) == [1]
    assert passing([0.2, 0.1], delta=1.0, keep=2) == []


def test_generated_text_becomes_an_alpaca_record():
    assert as_record("Instruction: Add 2 and 3.\nResponse: 5") == {
        "instruction": "Add 2 and 3.",
        "input": "",
        "output": "5",
    }
    assert as_record("no markers here") == {"instruction": "no markers here", "input": "", "output": ""}


def test_each_feature_gets_scored_candidates_and_a_contrastive_second_step(ray_cluster, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    sae = build_tiny_sae(tmp_path / "sae")
    weights = load_file(sae / "sae_weights.safetensors")
    weights["b_enc"][5] += 5.0  # feature 5 fires on most tokens, by how much varies
    weights["W_enc"][:, 9], weights["b_enc"][9] = 0.0, -1e3  # feature 9 never fires
    save_file(weights, sae / "sae_weights.safetensors")
    cfg = RunConfig.model_validate(
        {
            "input": {"paths": ["x"]},
            "model": {"name": str(tiny_model_dir), "dtype": "float32"},
            "sae": {"path": str(sae), "allow_poor_fit": True},
            "encode": {"device": "cpu"},
            "synthesis": {"n_candidates": 4, "n_contrastive": 6, "keep": 2, "max_new_tokens": 24},
        }
    )
    spans = pa.table(
        {
            "feature": [5, 5, 9],
            "rank": [1, 2, 1],
            "tokens": [["a span where ", "feature five", " is strong"], ["another one"], ["nine"]],
            "peak": [1, 0, 0],
        }
    )
    table, no_signal = synthesize(cfg.stack(), cfg.synthesis, [9, 5], spans, 0.0, {5: "the word five"})
    rows = table.to_pylist()
    # feature 9: step 1 all zero, retried once hotter with ids of its own, then no_signal and no step 2
    nine = [r for r in rows if r["feature"] == 9]
    assert no_signal == [9] and len(nine) == 8 and all(r["step"] == 1 and r["score"] == 0 for r in nine)
    assert sum("-1r-" in r["id"] for r in nine) == 4
    assert "the token where it is strongest" in nine[0]["prompt"] and "[[nine]]" in nine[0]["prompt"]
    assert "it peaks on the tokens 'nine'" in nine[0]["prompt"]  # no judge label: its peak tokens
    rows = [r for r in rows if r["feature"] == 5]
    step1, step2 = [r for r in rows if r["step"] == 1], [r for r in rows if r["step"] == 2]
    assert len(step1) == 4 and len(step2) == 6 and max(r["score"] for r in step1) > 0
    for r in rows:
        assert all(r[k] is not None for k in PROVENANCE) and r["feature"] == 5
        assert r["generator"] == str(tiny_model_dir)
        assert r["score"] == dict(zip(r["feat_ids"], r["feat_max"])).get(5, 0.0)  # g_5 of the candidate itself
        assert json.loads(r["record"]) == as_record(r["text"])
    assert "a span where [[feature five]] is strong" in step1[0]["prompt"] and "nine" not in step1[0]["prompt"]
    assert "The pattern: the word five." in step1[0]["prompt"]  # the judge's label describes it
    best, worst = max(step1, key=lambda r: r["score"]), min(step1, key=lambda r: r["score"])
    assert best["text"] in step2[0]["prompt"] and worst["text"] in step2[0]["prompt"]  # the contrastive pair
    # and, as step 1, what the feature is: its description and its strongest span, peak marked
    assert "The pattern: the word five." in step2[0]["prompt"] and "a span where [[feature five]]" in step2[0]["prompt"]
    assert f"{best['score']:.2f}" in step2[0]["prompt"] and f"{worst['score']:.2f}" in step2[0]["prompt"]
    assert all(r["passed"] == (r["score"] > 0.0) for r in step2) and not any(r["passed"] for r in step1)
    kept = [r for r in step2 if r["kept"]]
    assert len(kept) == min(2, sum(r["passed"] for r in step2)) and all(r["passed"] for r in kept)
    assert min((r["score"] for r in kept), default=0) >= max(
        (r["score"] for r in step2 if not r["kept"] and r["passed"]), default=0
    )
    again, _ = synthesize(cfg.stack(), cfg.synthesis, [5], spans, 0.0, {5: "the word five"})
    assert [r["text"] for r in again.to_pylist()] == [r["text"] for r in rows]  # seeded per feature


def test_the_vllm_engine_without_vllm_is_a_config_error_naming_the_key(ray_cluster):
    with pytest.raises(ConfigError, match="synthesis.engine: 'vllm' needs the vllm package"):
        check_vllm()


def test_raysel_synthesize_writes_samples_with_provenance_and_fac_before_and_after(
    ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path
):
    raw = run_cfg(tmp_path, tiny_model_dir, tiny_sae_dir, 30)
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()]
    anchor = write_jsonl(tmp_path / "anchor.jsonl", [r for r in demo[30:] if r["category"] == "code"][:8])
    raw |= {
        # few activated features a sample: the anchor has some the 30 samples never activate
        "fac": {"anchor": [str(anchor)], "reference": [fac_reference(tmp_path)], "n_features": 40, "target_active": 2},
        # delta unset: FAC's tau, so that a kept sample covers its feature
        "synthesis": {"max_features": 2, "n_candidates": 3, "n_contrastive": 3, "max_new_tokens": 24},
    }
    raw["encode"]["num_cpus"] = 2  # every CPU of the test cluster to the actor, as `raysel demo` does
    manifest = run(RunConfig.model_validate(raw), until="synthesis")
    out = tmp_path / "out"
    report = json.loads((out / "fac" / "report.json").read_text())
    m = json.loads((out / "selection" / "synthesis" / "manifest.json").read_text())
    assert m["fac_before"] == report["fac"]
    # one threshold, stored with F: FAC's calibrated tau, not the run's (activation.tau, 0 here)
    assert m["delta"] == report["tau"] == manifest["stages"]["task_features"]["tau"] > 0
    assert manifest["stages"]["stats"]["tau"] == 0
    assert m["features_tried"] == min(2, len(report["missing"])) > 0
    candidates = pq.read_table(out / "synthesis" / "candidates.parquet").to_pylist()
    step1, step2 = [c for c in candidates if c["step"] == 1], [c for c in candidates if c["step"] == 2]
    assert len(step1) == 3 * m["features_tried"] + sum("-1r-" in c["id"] for c in step1)  # + retries
    assert len(step2) == 3 * (m["features_tried"] - len(m["no_signal"]))
    assert all(all(k in c for k in PROVENANCE) for c in candidates)
    # the missing features tried first are those most common on the anchor
    share = {r["feature"]: r["anchor_share"] for r in pq.read_table(out / "fac" / "features.parquet").to_pylist()}
    tried = sorted({c["feature"] for c in candidates}, key=lambda j: (-share[j], j))
    assert tried == sorted(report["missing"], key=lambda j: (-share[j], j))[: m["features_tried"]]
    # something is kept, and what is kept covers a feature that was missing
    assert m["n_kept"] >= 1 and m["missing_after"] < m["missing_before"] and m["fac_after"] > m["fac_before"]
    records = [
        json.loads(line) for line in (out / "selection" / "synthesis" / "records.jsonl").read_text().splitlines()
    ]
    assert len(records) == m["n_kept"] == sum(c["kept"] for c in candidates)
    for r in records:
        assert {"instruction", "output", "provenance"} <= set(r) and set(PROVENANCE) <= set(r["provenance"])
        assert r["provenance"]["step"] == 2 and r["provenance"]["score"] > 0.0
    assert manifest["stages"]["synthesis"]["acceptance_rate"] == m["acceptance_rate"]
