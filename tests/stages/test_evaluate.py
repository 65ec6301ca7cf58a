"""The evaluate stage on a real run (tiny model, real Ray, real TRL and peft): every selection and the
random control fine-tune per seed, the results and paired intervals come out, the adapters load with
peft, a crash redoes only what was unfinished, and an eval set that overlaps the pool is refused."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import yaml

from raysel.cli import main
from raysel.config import ConfigError, RunConfig
from raysel.core import paths
from raysel.core.finetune import extract_answer, pad_id, response_nll
from raysel.core.records import chat_template_for
from raysel.pipeline import run
from raysel.stages.evaluate import Unit, loss_examples, set_folder
from tests.conftest import DEMO, run_cfg, write_jsonl

SEEDS = 2


@pytest.fixture(scope="module")
def evaluated(ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path_factory):
    """coverage and longest at 8 of 40 demo rows, evaluated with 2 seeds on 6 held-out demo rows."""
    tmp = tmp_path_factory.mktemp("evaluate")
    raw = run_cfg(tmp, tiny_model_dir, tiny_sae_dir, 40)
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()]
    held_out = write_jsonl(tmp / "held_out.jsonl", rows[500:506])
    raw |= {
        "select": {"budget": 8, "methods": ["coverage", "longest", "random"]},
        "evaluate": {
            "seeds": SEEDS,
            "sets": [{"name": "held_out", "paths": [str(held_out)]}],
            "lora_layers": 2,
            "batch_size": 4,
            "max_tokens": 96,
            "learning_rate": 1e-2,
            "dtype": "float32",
            "metrics": ["loss", "exact_match"],
            "max_new_tokens": 4,
        },
    }
    cfg = RunConfig.model_validate(raw)
    manifest = run(cfg, until="evaluate")
    return tmp / "out", cfg, manifest


def test_every_selection_and_the_control_fine_tune_once_per_seed(evaluated):
    """Catches a method, a seed or the base model left out of the results, the user's own `random`
    fine-tuned beside the control, and a paired difference taken against the wrong rows."""
    out, _, manifest = evaluated
    results = pq.read_table(out / paths.EVALUATE / "results.parquet").to_pylist()
    got = {(r["method"], r["seed"], r["metric"]) for r in results}
    units = {("base", None)} | {(m, s) for m in ("coverage", "longest", "random") for s in range(SEEDS)}
    assert got == {(m, s, metric) for m, s in units for metric in ("loss", "exact_match")}
    assert all(r["set"] == "held_out" and r["n"] > 0 for r in results if r["metric"] == "loss")
    # exact_match asks the held-out rows whose reference has a final number, and only those
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()][500:506]
    numeric = sum(extract_answer(r["output"]) is not None for r in rows)
    assert 0 < numeric < len(rows)
    assert {r["n"] for r in results if r["metric"] == "exact_match"} == {numeric}
    results = [r for r in results if r["metric"] == "loss"]
    summary = json.loads((out / paths.EVALUATE / "summary.json").read_text())
    assert summary == manifest["stages"]["evaluate"]["summary"]
    loss = {(r["method"], r["seed"]): r["value"] for r in results}
    for method in ("coverage", "longest"):
        entry = summary["by_method"][method]["held_out"]["loss"]
        deltas = [loss[(method, s)] - loss[("random", s)] for s in range(SEEDS)]
        assert entry["delta_vs_random"] == pytest.approx(sum(deltas) / SEEDS)
        assert entry["delta_ci"][0] <= entry["delta_vs_random"] <= entry["delta_ci"][1]
    assert "delta_vs_random" not in summary["by_method"]["random"]["held_out"]["loss"]
    assert summary["base"]["held_out"]["loss"] == loss[("base", None)]
    # the control trains on the same number of samples as the selections, a different draw per seed
    controls = [json.loads((out / Unit("random", s).marker("train")).read_text()) for s in range(SEEDS)]
    assert [c["n_train"] + c["n_skipped"] for c in controls] == [8, 8]


def test_raysel_evaluate_prints_and_reports_each_method_against_random(evaluated, tmp_path, capsys):
    """Through the CLI: catches an evaluate whose results never reach what a user reads (the printed
    summary, the report's panel)."""
    out, cfg, manifest = evaluated
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.public_dict()))
    assert main(["evaluate", str(config)]) == 0
    printed = capsys.readouterr().out
    delta = manifest["stages"]["evaluate"]["summary"]["by_method"]["coverage"]["held_out"]["loss"]["delta_vs_random"]
    assert f"{3 * SEEDS} proxy fine-tunes" in printed and f"({delta:+.4f} [" in printed
    page = (out / "report.html").read_text()
    assert 'id="evaluate"' in page and "Proxy fine-tunes: loss on held_out" in page
    assert all(f"<td>{m}</td>" in page for m in ("coverage", "longest", "random", "base model"))


def test_adapters_load_with_peft_and_change_the_model(evaluated, tiny_model_dir):
    """Catches an adapter saved before training (LoRA's B starts at zero) or in a form peft cannot load,
    and a score the stage took wrong from the layers below the adapters, which it runs once for every unit
    (lora_layers 2 of 4 here): split at another layer, or from another set's states."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, cfg, _ = evaluated
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, out / Unit("coverage", 1).adapter).eval()
    b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert b and any(float(p.abs().max()) > 0 for p in b)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = pq.read_table(out / set_folder("held_out") / "prepared", columns=["messages", "text"]).to_pylist()
    examples = loss_examples(tok, chat_template_for(tok, cfg.prepare.chat_template), rows, cfg.evaluate)
    total, count = response_nll(tuned, examples, cfg.evaluate.batch_size, pad_id(tok))  # the whole model
    scored = json.loads((out / Unit("coverage", 1).marker("held_out")).read_text())["scores"]["loss"]
    assert scored["n"] == count and scored["value"] == pytest.approx(total / count, rel=1e-5)


def test_a_crashed_evaluate_redoes_only_the_unfinished(evaluated):
    """Catches a resume that retrains finished adapters, or that skips one whose marker is missing."""
    out, cfg, _ = evaluated
    unfinished = Unit("longest", 0)
    markers = sorted((out / paths.EVALUATE / "_done").rglob("*.json"))
    assert len(markers) == 1 + 3 * SEEDS * 2  # base's score, and each fine-tune's train and score
    (out / unfinished.marker("train")).unlink()  # as a crash mid-fine-tune leaves it
    (out / paths.marker("evaluate")).unlink()
    before = {m: os.stat(m).st_mtime_ns for m in markers if m.exists()}
    run(cfg, until="evaluate")
    rewritten = {m for m in markers if not m.exists() or m not in before or os.stat(m).st_mtime_ns != before[m]}
    assert rewritten == {out / unfinished.marker("train"), out / unfinished.marker("held_out")}


def test_adapters_of_other_settings_are_refused_untouched_and_retrained_only_with_force(evaluated, tmp_path):
    """The bug: a changed evaluate setting removed every adapter and its scores and trained them
    again, silently: minutes here, GPU-hours on a large proxy."""
    import shutil

    out, cfg, _ = evaluated
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    other = RunConfig.model_validate(cfg.model_dump() | {"output": {"root": str(copy), "report": False}}
                                     | {"evaluate": cfg.evaluate.model_dump() | {"learning_rate": 5e-3}})  # fmt: skip
    adapters = {p: p.read_bytes() for p in (copy / paths.EVALUATE / "adapters").rglob("*.safetensors")}
    with pytest.raises(ConfigError, match=r"evaluate: 6 adapter\(s\) .* were trained under another settings"):
        run(other, until="evaluate")
    assert adapters and {p: p.read_bytes() for p in adapters} == adapters
    run(other, until="evaluate", force=True)
    trained = json.loads((copy / Unit("coverage", 0).marker("train")).read_text())
    assert trained["key"]["settings"]["learning_rate"] == 5e-3


@pytest.mark.parametrize("shared", ["id", "instruction"])
def test_an_eval_set_that_shares_a_row_with_the_pool_is_refused(evaluated, tmp_path, shared):
    """Catches scoring a model on samples it may have been trained on: the same id, or the same
    instruction under another id, in other case and spacing."""
    out, cfg, _ = evaluated
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()]
    pooled = rows[7]  # the pool is the first 40
    if shared == "instruction":
        pooled = pooled | {"id": "fresh-id", "instruction": "  " + pooled["instruction"].upper().replace(" ", "\n ")}
    leaky = write_jsonl(tmp_path / "leaky.jsonl", [rows[500], pooled])
    sets = [{"name": "leaky", "paths": [str(leaky)]}]
    bad = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"sets": sets})})
    what = f"id '{rows[7]['id']}'" if shared == "id" else "the instruction of 'fresh-id'"
    with pytest.raises(ConfigError, match=rf"leaky shares {what} with the pool \(id '{rows[7]['id']}'\)"):
        run(RunConfig.model_validate(bad.model_dump()), until="evaluate")


def test_evaluate_without_eval_sets_is_refused_before_any_work(evaluated, tmp_path, capsys):
    """Catches a run that encodes and selects for minutes, then fails for want of an eval set."""
    _, cfg, _ = evaluated
    raw = cfg.public_dict() | {"output": {"root": str(tmp_path / "fresh")}}
    raw["evaluate"]["sets"] = []
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["evaluate", str(config)]) == 3
    assert "evaluate.sets: name at least one eval set" in capsys.readouterr().err
    assert not (tmp_path / "fresh" / paths.PREPARED).exists()
