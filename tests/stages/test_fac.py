"""`raysel fac` end to end: FAC of the input against an anchor with the missing features' spans, and
F from an LLM judge (the tiny model as judge)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from raysel import cli
from raysel.config import RunConfig
from raysel.core.judge import LEVELS, kept
from raysel.pipeline import run
from tests.conftest import DEMO, fac_reference, write_jsonl


def test_raysel_fac_reports_coverage_and_the_missing_features_with_spans(stats_run, tmp_path, capsys):
    root, cfg, _ = stats_run
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()]
    anchor = write_jsonl(tmp_path / "anchor.jsonl", [r for r in demo[40:] if r["category"] == "code"][:10])
    # few activated features per sample, so that the anchor has some the 40 samples never activate
    raw = json.loads(cfg.model_dump_json()) | {
        "fac": {"anchor": [str(anchor)], "reference": [fac_reference(tmp_path)], "n_features": 40},
        "activation": {"target_active": 2},
    }
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


def test_an_llm_judge_explains_verifies_and_rates_the_enriched_shortlist(stats_run, tmp_path):

    root, cfg, _ = stats_run
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()]
    anchor = write_jsonl(tmp_path / "anchor.jsonl", [r for r in demo[40:] if r["category"] == "math"][:6])
    raw = json.loads(cfg.model_dump_json()) | {
        "activation": {"target_active": 2},
        "fac": {
            "anchor": [str(anchor)],
            "reference": [fac_reference(tmp_path)],
            "n_features": 6,
            "judge_task": "grade-school math word problems",
        },
    }
    raw["s3"] = {}
    manifest = run(RunConfig.model_validate(raw), until="fac")
    verdicts = pq.read_table(root / "fac" / "judged.parquet").to_pylist()
    assert 0 < len(verdicts) <= 6
    spans = pq.read_table(root / "anchor" / "stats" / "spans.parquet").to_pylist()
    for v in verdicts:
        assert (
            v["relevance"] in LEVELS
            and len(v["relevance_logprobs"]) == 4
            and v["generator"] == str(raw["model"]["name"])
        )
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


def test_f_comes_from_the_anchor_and_reference_alone_so_a_subsets_fac_compares_with_its_supersets(stats_run, tmp_path):
    """F was once enriched on the anchor over the evaluated set itself: a subset and its superset got
    different F, and FACs that could not be compared. τ is fixed here: a calibrated τ is per run."""
    root, cfg, manifest = stats_run
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()]
    anchor = write_jsonl(tmp_path / "anchor.jsonl", [r for r in demo[40:] if r["category"] == "code"][:10])
    superset = json.loads(cfg.model_dump_json()) | {
        "fac": {"anchor": [str(anchor)], "reference": [fac_reference(tmp_path)], "n_features": 40},
        "activation": {"tau": manifest["stages"]["stats"]["tau"]},
        "s3": {},
    }
    subset_rows = write_jsonl(tmp_path / "subset.jsonl", demo[:15])
    subset = superset | {
        "input": superset["input"] | {"paths": [str(subset_rows)]},
        "output": {"root": str(tmp_path / "subset")},
    }
    reports, features = [], []
    for raw, out in ((superset, root), (subset, tmp_path / "subset")):
        run(RunConfig.model_validate(raw), until="fac")
        reports.append(json.loads((out / "fac" / "report.json").read_text()))
        features.append(pq.read_table(out / "fac" / "features.parquet")["feature"].to_pylist())
    assert features[0] == features[1] and len(features[0]) > 0
    assert reports[1]["n_evaluated"] == 15 and reports[0]["n_evaluated"] == 40
    assert reports[1]["fac"] <= reports[0]["fac"] and set(reports[0]["missing"]) <= set(reports[1]["missing"])
