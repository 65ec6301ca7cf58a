"""FAC on hand-built stores, FAC-guided selection, and the top-activating spans and `raysel fac`
end to end on a real Ray cluster with the tiny model and SAE."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from raysel import cli
from raysel.config import RunConfig
from raysel.methods.fac import fac, fac_greedy
from raysel.pipeline import run
from raysel.stages.spans import WINDOW, run_spans, window
from raysel.core.storage import Storage
from tests.conftest import write_jsonl
from tests.conftest import DEMO, run_cfg
from tests.test_task import store_table


def rows(*samples: dict) -> list[dict]:
    """{feature: activation} per sample -> store rows (max-pool = sum-pool = the value)."""
    return [{"id": f"s{i}", "n_tokens": 1, "feats": {j: (v, v) for j, v in s.items()}} for i, s in enumerate(samples)]


def test_fac_and_missing_features_on_a_hand_built_store():
    anchor = store_table(rows({1: 2.0, 2: 1.0}, {1: 3.0, 3: 4.0}, {5: 2.0, 6: 0.5}))
    evaluated = store_table(rows({1: 1.0, 3: 0.2}, {3: 5.0, 6: 3.0}, {2: 0.5}))
    features = np.array([1, 2, 3, 4, 5, 6])
    summary, table = fac(anchor, evaluated, features, tau=0.6, d_sae=8)
    # above tau 0.6 the anchor activates 1, 2, 3, 5 (6 only at 0.5): F(P) = {1, 2, 3, 5}; 4 never fires.
    # Q activates 1, 3, 6 (2 only at 0.5, 3 at 5.0): F(Q) = {1, 3}
    assert summary["n_in_anchor"] == 4 and summary["n_covered"] == 2 and summary["fac"] == 0.5
    assert summary["missing"] == [2, 5]
    # anchor shares: 1 -> 2/3, 2 -> 1/3, 3 -> 1/3, 5 -> 1/3; maxima: 3, 1, 4, 2
    assert summary["fac_frequency"] == pytest.approx((2 / 3 + 1 / 3) / (2 / 3 + 1 / 3 + 1 / 3 + 1 / 3))
    assert summary["fac_magnitude"] == pytest.approx((3 + 4) / (3 + 1 + 4 + 2))
    assert table.column("missing").to_pylist() == [False, True, False, False, True, False]


@pytest.mark.parametrize("seed", range(4))
def test_fac_of_a_superset_is_at_least_that_of_its_subset(seed):
    rng = np.random.default_rng(seed)

    def random_rows(n):
        return rows(*[{int(j): float(rng.gamma(1.5)) for j in rng.choice(40, rng.integers(1, 6), replace=False)}
                      for _ in range(n)])

    anchor, pool = store_table(random_rows(20)), random_rows(30)
    features = np.arange(40)
    small, big = store_table(pool[:10]), store_table(pool)
    s_small, _ = fac(anchor, small, features, 0.5, 40)
    s_big, _ = fac(anchor, big, features, 0.5, 40)
    for key in ("fac", "fac_frequency", "fac_magnitude"):
        assert s_big[key] >= s_small[key]
    assert set(s_big["missing"]) <= set(s_small["missing"])


def test_fac_greedy_covers_the_missing_features_strongest_first():
    pool = store_table(rows({1: 0.5, 2: 0.5}, {1: 3.0}, {2: 1.0, 3: 1.0}, {7: 9.0}, {3: 2.0, 2: 2.0}))
    order, added = fac_greedy(pool, np.array([1, 2, 3]), tau=0.1, k=5)
    # s0, s2 and s4 each add two; s4 is the strongest. Then 1 is left: s1 (3.0) beats s0 (0.5).
    # Nothing adds more: coverage starts over and s2 (two features) goes next, then s0; s3 holds none.
    assert order == ["s4", "s1", "s2", "s0", "s3"] and added == [2, 1, 2, 1, 0]


def test_a_window_keeps_32_tokens_around_the_peak_and_shifts_at_the_edges():
    assert window(40, 100) == (25, 57) and window(2, 100) == (0, WINDOW) and window(95, 100) == (68, 100)
    assert window(3, 10) == (0, 10)


@pytest.fixture(scope="module")
def stats_run(ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spans")
    raw = run_cfg(tmp, tiny_model_dir, tiny_sae_dir, 40)
    manifest = run(RunConfig.model_validate(raw), until="stats")
    return tmp / "out", RunConfig.model_validate(raw), manifest


def test_spans_re_encode_the_top_samples_and_find_their_peak(stats_run):
    root, cfg, manifest = stats_run
    storage = Storage(str(root), cfg.s3)
    fp = manifest["stages"]["encode"]["fingerprint"]
    stats = {r["feature"]: r for r in pq.read_table(root / "stats" / "features.parquet").to_pylist()}
    prepared = {r["id"]: r["text"] for r in pq.read_table(root / "prepared", columns=["id", "text"]).to_pylist()}
    wanted = [j for j in sorted(stats) if stats[j]["top_ids"]][:3]
    spans = run_spans(cfg, storage, fp, wanted).to_pylist()
    for j in wanted:
        mine = [r for r in spans if r["feature"] == j]
        assert [r["id"] for r in mine] == stats[j]["top_ids"] and [r["rank"] for r in mine] == list(range(1, len(mine) + 1))
        np.testing.assert_allclose([r["value"] for r in mine], stats[j]["top_values"], rtol=1e-4)
        for r in mine:
            assert 0 < len(r["tokens"]) == len(r["acts"]) <= WINDOW
            assert r["acts"][r["peak"]] == pytest.approx(r["value"]) and max(r["acts"]) == pytest.approx(r["value"])
            assert "".join(r["tokens"]) in prepared[r["id"]]

    marker = json.loads((root / "stages" / "spans.json").read_text())
    more = [j for j in sorted(stats) if stats[j]["top_ids"]][3:5]
    both = run_spans(cfg, storage, fp, wanted + more).to_pylist()
    assert [r for r in both if r["feature"] in wanted] == spans  # kept, not recomputed differently
    assert json.loads((root / "stages" / "spans.json").read_text())["n_features"] == marker["n_features"] + 2


def test_raysel_fac_reports_coverage_and_the_missing_features_with_spans(stats_run, tmp_path, capsys):
    root, cfg, _ = stats_run
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()]
    anchor = write_jsonl(tmp_path / "anchor.jsonl", [r for r in demo[40:] if r["category"] == "code"][:10])
    # few activated features per sample, so that the anchor has some the 40 samples never activate
    raw = json.loads(cfg.model_dump_json()) | {"fac": {"anchor": [str(anchor)], "n_features": 40},
                                               "activation": {"target_active": 2}}
    raw["s3"] = {}
    config = tmp_path / "fac.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert cli.main(["fac", str(config)]) == 0
    report = json.loads((root / "fac" / "report.json").read_text())
    features = pq.read_table(root / "fac" / "features.parquet").to_pylist()
    assert report["n_anchor"] == 10 and report["n_evaluated"] == 40 and 0 < report["n_in_anchor"] <= 40
    assert report["fac"] == report["n_covered"] / report["n_in_anchor"]
    assert report["missing"] == [r["feature"] for r in features if r["missing"]] and report["missing"]
    assert all(r["evaluated_share"] == 0 and r["anchor_share"] > 0 for r in features if r["missing"])
    spans = pq.read_table(root / "fac" / "missing_spans.parquet").to_pylist()
    assert {r["feature"] for r in spans} == set(report["missing"])
    assert set(report["missing_examples"]) == {str(j) for j in report["missing"]}
    out = capsys.readouterr().out
    assert f"FAC       {report['fac']:.4f}" in out and "fac/" in out


def test_fac_selection_raises_fac_over_what_the_evaluated_set_had(stats_run, tmp_path):
    root, cfg, _ = stats_run
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()]
    anchor = write_jsonl(tmp_path / "anchor.jsonl", [r for r in demo[40:] if r["category"] == "math"][:10])
    have = write_jsonl(tmp_path / "have.jsonl", [r for r in demo[60:] if r["category"] == "safety"][:5])
    raw = json.loads(cfg.model_dump_json()) | {
        "fac": {"anchor": [str(anchor)], "evaluated": [str(have)], "n_features": 30}, "activation": {"target_active": 2},
        "select": {"methods": ["fac"], "budget": 6}, "output": {"root": str(tmp_path / "out")}}
    raw["s3"] = {}
    manifest = run(RunConfig.model_validate(raw), until="select")
    m = json.loads((tmp_path / "out" / "selection" / "fac" / "manifest.json").read_text())
    assert m["fac_missing_before"] > 0 and m["fac_after"] > m["fac_before"]
    assert m["fac_after"] >= m["fac_random_after"]
    assert m["fac_pool"] >= m["fac_after"]
    selected = pq.read_table(tmp_path / "out" / "selection" / "fac" / "selected.parquet").to_pylist()
    assert len(selected) == 6 and selected[0]["gain"] >= selected[1]["gain"]
    assert manifest["stages"]["select"]["budgets"] == {"fac": 6}


def test_an_llm_judge_explains_verifies_and_rates_the_enriched_shortlist(stats_run, tmp_path):
    from raysel.methods.fac_judge import LEVELS, kept

    root, cfg, _ = stats_run
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()]
    anchor = write_jsonl(tmp_path / "anchor.jsonl", [r for r in demo[40:] if r["category"] == "math"][:6])
    raw = json.loads(cfg.model_dump_json()) | {"activation": {"target_active": 2}, "fac": {
        "anchor": [str(anchor)], "n_features": 6, "judge_task": "grade-school math word problems"}}
    raw["s3"] = {}
    manifest = run(RunConfig.model_validate(raw), until="fac")
    verdicts = pq.read_table(root / "fac" / "judged.parquet").to_pylist()
    assert 0 < len(verdicts) <= 6
    spans = pq.read_table(root / "anchor" / "stats" / "spans.parquet").to_pylist()
    for v in verdicts:
        assert v["relevance"] in LEVELS and len(v["relevance_logprobs"]) == 4 and v["generator"] == str(raw["model"]["name"])
        assert v["relevance"] == LEVELS[int(np.argmax(v["relevance_logprobs"]))]  # the likeliest answer is the verdict
        # the explain prompt shows the feature's own spans, peak marked
        top = next(s for s in spans if s["feature"] == v["feature"] and s["rank"] == 1)
        assert "[[" + top["tokens"][top["peak"]] + "]]" in v["explain_prompt"]
    features = pq.read_table(root / "fac" / "features.parquet")["feature"].to_pylist()
    assert features == kept(pq.read_table(root / "fac" / "judged.parquet"), "maybe")
    assert set(kept(pq.read_table(root / "fac" / "judged.parquet"), "yes")) <= set(features)
    assert "judged by an LLM" in manifest["stages"]["fac"]["feature_source"]
    with pytest.raises(ValueError, match="fac.features .* or fac.judge_task"):
        RunConfig.model_validate(raw | {"fac": raw["fac"] | {"features": [1]}})


def test_the_judge_keeps_verified_features_at_or_above_the_floor():
    import pyarrow as pa

    from raysel.methods.fac_judge import VERDICTS, kept

    verdicts = pa.Table.from_pylist([
        {"feature": 1, "verified": True, "relevance": "Yes"}, {"feature": 2, "verified": True, "relevance": "Maybe"},
        {"feature": 3, "verified": False, "relevance": "Yes"}, {"feature": 4, "verified": True, "relevance": "No"},
        {"feature": 5, "verified": True, "relevance": "Probably"}], schema=VERDICTS)
    assert kept(verdicts, "maybe") == [1, 2, 5]
    assert kept(verdicts, "probably") == [1, 5]
    assert kept(verdicts, "yes") == [1]
