"""`raysel fac` end to end: FAC of the input against an anchor with the missing features' spans, and
F from an LLM judge (the tiny model as judge)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from raysel import cli
from raysel.config import RunConfig
from raysel.core.fac import enriched_features
from raysel.core.features import FeatureStore
from raysel.core.judge import LEVELS, kept
from raysel.core.spans import find_spans
from raysel.core.storage import Storage
from raysel.pipeline import run
from tests.conftest import DEMO, fac_reference, fac_root, write_jsonl


def test_raysel_fac_reports_coverage_and_the_missing_features_with_spans(fac_ready, tmp_path, capsys):
    anchor = write_jsonl(tmp_path / "anchor.jsonl", demo_rows("code", 8))
    # few activated features per sample, so that the anchor has some the 40 samples never activate
    fac = {"anchor": [str(anchor)], "reference": [fac_reference(tmp_path)], "n_features": 40, "target_active": 2}
    raw, root = fac_root(fac_ready, tmp_path / "run", fac=fac)
    config = tmp_path / "fac.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert cli.main(["fac", str(config)]) == 0
    report = json.loads((root / "fac" / "report.json").read_text())
    features = pq.read_table(root / "fac" / "features.parquet").to_pylist()
    assert report["n_anchor"] == 8 and report["n_evaluated"] == 40 and 0 < report["n_in_anchor"] <= 40
    assert report["fac"] == report["n_covered"] / report["n_in_anchor"]
    assert report["missing"] == [r["feature"] for r in features if r["missing"]] and report["missing"]
    assert all(r["evaluated_share"] == 0 and r["anchor_share"] > 0 for r in features if r["missing"])
    spans = pq.read_table(root / "fac" / "missing_spans.parquet").to_pylist()
    assert {r["feature"] for r in spans} == set(report["missing"])
    assert set(report["missing_examples"]) == {str(j) for j in report["missing"]}
    out = capsys.readouterr().out
    assert f"FAC       {report['fac']:.4f}" in out and "fac/" in out


def test_an_llm_judge_explains_verifies_and_rates_the_enriched_shortlist(fac_ready, tmp_path):
    anchor = write_jsonl(tmp_path / "anchor.jsonl", demo_rows("math", 6))
    fac = {
        "anchor": [str(anchor)],
        "reference": [fac_reference(tmp_path)],
        "n_features": 6,
        "target_active": 2,
        "judge_task": "grade-school math word problems",
    }
    raw, root = fac_root(fac_ready, tmp_path / "run", fac=fac)
    cfg = RunConfig.model_validate(raw)
    manifest = run(cfg, until="fac")
    verdicts = pq.read_table(root / "fac" / "judged.parquet").to_pylist()
    assert 0 < len(verdicts) <= 6
    features = [v["feature"] for v in verdicts]
    spans = find_spans(
        cfg.stack(), Storage(str(root / "anchor"), cfg.s3), features
    ).to_pylist()  # as the judge saw them
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


def test_f_and_its_tau_come_from_the_anchor_and_reference_alone_so_a_subsets_fac_compares_with_its_supersets(
    fac_ready, tmp_path
):
    """On the default path, nothing pinned: the run's own tau is calibrated on its input, so it moves
    with Q. F was once enriched over Q itself, and its threshold was once the run's: either way a
    subset and its superset got different F, and FACs that could not be compared."""
    anchor = write_jsonl(tmp_path / "anchor.jsonl", demo_rows("code", 8))
    fac = {"anchor": [str(anchor)], "reference": [fac_reference(tmp_path)], "n_features": 40}
    superset, root = fac_root(fac_ready, tmp_path / "superset", fac=fac, activation={"target_active": 4})
    subset_rows = write_jsonl(
        tmp_path / "subset.jsonl", [json.loads(line) for line in DEMO.read_text().splitlines()[:15]]
    )
    subset = superset | {
        "input": superset["input"] | {"paths": [str(subset_rows)]},
        "output": {"root": str(tmp_path / "subset")},
    }
    for side in ("anchor", "reference"):  # the same sets, encoded once: F may depend on them alone
        shutil.copytree(root / side, tmp_path / "subset" / side)
    manifests, reports, features = [], [], []
    for raw, out in ((superset, root), (subset, tmp_path / "subset")):
        manifests.append(run(RunConfig.model_validate(raw), until="fac"))
        reports.append(json.loads((out / "fac" / "report.json").read_text()))
        features.append(pq.read_table(out / "fac" / "features.parquet")["feature"].to_pylist())
    run_tau, fac_tau = ([m["stages"][s]["tau"] for m in manifests] for s in ("stats", "task_features"))
    assert run_tau[0] != run_tau[1]  # the run's tau moved with Q, so a threshold taken from it would too
    assert fac_tau[0] == fac_tau[1] == reports[0]["tau"] == reports[1]["tau"] > 0
    assert features[0] == features[1] and len(features[0]) > 0
    assert reports[1]["n_evaluated"] == 15 and reports[0]["n_evaluated"] == 40
    assert reports[1]["fac"] <= reports[0]["fac"] and set(reports[0]["missing"]) <= set(reports[1]["missing"])
    assert "calibrated on the reference" in reports[0]["tau_source"]


# F is cached in stages/task_features.json. Its key once held the side sets' encode keys, which were
# always null: in one root, another anchor, another SAE or an edited reference silently reused the old
# F. Each test below changes one of them in a root and compares the F the stage committed with the F the
# root's anchor and reference stores give now. (Run on f93ec9f through `raysel fac`, against a fresh
# root's F, each of the three failed.)


def task_features(raw: dict, force: bool = False) -> tuple[list[int], list[int]]:
    """F as the task_features stage committed it (what `raysel fac`, `raysel synthesize` and method
    `fac` read), and F recomputed from the anchor and reference stores the root holds now (their
    encode is keyed by content, model and SAE, so those are always current)."""
    used = run(RunConfig.model_validate(raw), until="task_features", force=force)["stages"]["task_features"]["features"]
    root, cfg = Path(raw["output"]["root"]), RunConfig.model_validate(raw)
    side = {name: FeatureStore(Storage(str(root / name), cfg.s3)) for name in ("anchor", "reference")}
    tau = side["reference"].calibrate(cfg.fac.target_active)["tau"]  # FAC's threshold, as the stores give it now
    d_sae = json.loads((root / "stats" / "summary.json").read_text())["d_sae"]
    now = enriched_features(side["anchor"].table(), side["reference"].table(), tau, d_sae, cfg.fac.n_features)
    assert used  # an empty F would compare equal to any other
    return used, now.tolist()


def demo_rows(category: str, n: int, skip: int = 40) -> list[dict]:
    return [
        r for r in (json.loads(line) for line in DEMO.read_text().splitlines()[skip:]) if r["category"] == category
    ][:n]


@pytest.fixture(scope="module")
def fac_ready(stats_run, tmp_path_factory):
    """stats_run's root with the 8 code rows as anchor and the reference encoded, in stats_run's shape:
    the tests copy it (fac_root), so each side set they share is encoded once, not once a test (each
    encode is a model actor's start)."""
    tmp = tmp_path_factory.mktemp("fac-ready")
    anchor = write_jsonl(tmp / "anchor.jsonl", demo_rows("code", 8))
    fac = {"anchor": [str(anchor)], "reference": [fac_reference(tmp)], "n_features": 12}
    raw, root = fac_root(stats_run, tmp / "run", fac=fac)
    run(RunConfig.model_validate(raw), until="task_features")
    return root, *stats_run[1:]


def test_another_anchor_in_the_same_root_gets_its_own_task_features(fac_ready, tmp_path):
    code = write_jsonl(tmp_path / "code.jsonl", demo_rows("code", 8))
    math = write_jsonl(tmp_path / "math.jsonl", demo_rows("math", 8))
    reference = fac_reference(tmp_path)
    fac = {"reference": [reference], "n_features": 12}
    first, _ = task_features(fac_root(fac_ready, tmp_path / "run", fac=fac | {"anchor": [str(code)]})[0])
    swapped, now = task_features(fac_root(fac_ready, tmp_path / "run", fac=fac | {"anchor": [str(math)]})[0])
    assert swapped == now and swapped != first


def test_another_sae_at_the_same_tau_recomputes_the_task_features(fac_ready, tmp_path):
    """The second SAE is the first with its features permuted: the same activations under other ids."""
    from safetensors.torch import load_file, save_file

    sae = tmp_path / "permuted-sae"
    shutil.copytree(fac_ready[1].sae.path, sae)
    weights = load_file(sae / "sae_weights.safetensors")
    order = torch.randperm(weights["W_enc"].shape[1], generator=torch.Generator().manual_seed(1))
    weights |= {"W_enc": weights["W_enc"][:, order], "b_enc": weights["b_enc"][order], "W_dec": weights["W_dec"][order]}
    save_file({k: v.contiguous() for k, v in weights.items()}, sae / "sae_weights.safetensors")
    anchor = write_jsonl(tmp_path / "anchor.jsonl", demo_rows("code", 8))
    fac = {"fac": {"anchor": [str(anchor)], "reference": [fac_reference(tmp_path)], "n_features": 12}}
    raw, root = fac_root(fac_ready, tmp_path / "run", **fac)
    first, _ = task_features(raw)
    swapped, now = task_features(raw | {"sae": raw["sae"] | {"path": str(sae)}}, force=True)  # the pool re-encoded
    assert swapped == now and swapped != first
    # the pool, the anchor and the reference, all due again, went through one pass of the encoders (one
    # model load on one actor), not a pass each: would catch the side sets loading the model again
    s3 = RunConfig.model_validate(raw).s3
    markers = {
        side: FeatureStore(Storage(str(root / side), s3)).done_shards().values() for side in ("", "anchor", "reference")
    }
    assert all(markers.values()) and len({m["actor"] for ms in markers.values() for m in ms}) == 1


def test_a_reference_edited_in_place_recomputes_the_task_features(fac_ready, tmp_path):
    """The edit keeps the path: once the reference holds the anchor's own rows, what the anchor
    activates is not enriched over it the way it was over the generic mix."""
    anchor_rows = demo_rows("code", 8)
    anchor = write_jsonl(tmp_path / "anchor.jsonl", anchor_rows)
    reference = Path(fac_reference(tmp_path))
    fac = {"fac": {"anchor": [str(anchor)], "reference": [str(reference)], "n_features": 12}}
    first, _ = task_features(fac_root(fac_ready, tmp_path / "run", **fac)[0])
    generic = reference.read_text().splitlines()
    reference.write_text("\n".join([json.dumps(r) for r in anchor_rows] + generic[:10]) + "\n")
    edited, now = task_features(fac_root(fac_ready, tmp_path / "run", **fac)[0])
    assert edited == now and edited != first


def test_the_default_reference_is_a_broad_mix_disjoint_from_the_data_it_measures():
    """Would catch a reference rebuilt so that it overlaps the demo corpus or ../shared/data (F enriched
    against a set holding the anchor's own rows loses what marks the task), a licence it does not
    state, or one task making up most of it."""
    import collections

    from raysel.core import paths
    from tests.conftest import REPO

    def key(r):
        return " ".join(f"{r['instruction']}\n{r.get('input') or ''}".strip().lower().split())

    rows = [json.loads(line) for line in open(paths.reference_data())]  # not splitlines: U+2028 is in a row
    # the demo corpus and its eval sets, and ../shared/data where this checkout has it beside it (the
    # script that builds the reference leaves out both)
    measured = [DEMO, *sorted((REPO / "raysel" / "data" / "eval").glob("*.jsonl"))]
    measured += sorted((REPO.parent / "shared" / "data").glob("*.jsonl"))
    assert len(measured) >= 4, measured
    taken = {key(json.loads(line)) for path in measured for line in open(path)}
    assert len(rows) == 1930 and not {key(r) for r in rows} & taken
    assert {r["license"] for r in rows} == {"Apache-2.0"} and len({r["id"] for r in rows}) == len(rows)
    assert max(collections.Counter(r["source"] for r in rows).values()) == 7
