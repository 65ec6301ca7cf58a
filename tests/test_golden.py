"""Equivalence guard for refactors: every selection method and the FAC measure on the tiny model
and SAE, against outputs frozen before the architecture moved (tests/golden/tiny.json).

It catches a refactor that changes what any method picks, in which order, or with what score.
After an intended change of behaviour, refreeze with RAYSEL_FREEZE_GOLDEN=1 and say why in the
commit."""

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raysel.config import RunConfig
from raysel.pipeline import run
from tests.conftest import DEMO, fac_reference, run_cfg, write_jsonl

GOLDEN = Path(__file__).parent / "golden" / "tiny.json"
METHODS = ["coverage", "simscale", "random", "longest", "mona", "igds", "fac", "kcenter", "dense"]


def golden_config(tmp, model_dir, sae_dir) -> dict:
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()]
    targets = write_jsonl(tmp / "targets.jsonl", [r for r in demo[60:] if r["category"] == "math"][:8])
    anchor = write_jsonl(tmp / "anchor.jsonl", [r for r in demo[40:] if r["category"] == "math"][:10])
    have = write_jsonl(tmp / "have.jsonl", [r for r in demo[60:] if r["category"] == "safety"][:5])
    return run_cfg(tmp, model_dir, sae_dir, 60) | {
        # IGDS skips held-out targets that do not fit with their answer: these math targets need 512
        "prepare": {"max_tokens": 512, "rows_per_file": 8},
        "activation": {"target_active": 4},
        "select": {
            "budget": 10,
            "methods": [
                "coverage",
                "simscale",
                "random",
                "longest",
                {"name": "mona", "targets": [str(targets)]},
                {
                    "name": "igds",
                    "targets": [str(targets)],
                    "candidates": 6,
                    "keep": 2,
                    "budget": 0.25,
                    "fallback": "recall",
                },
                {"name": "fac", "evaluated": [str(have)]},
                "kcenter",
                "dense",
            ],
        },
        "fac": {"anchor": [str(anchor)], "reference": [fac_reference(tmp)], "n_features": 30},
    }


def captured(root: Path) -> dict:
    out = {}
    for method in METHODS:
        rows = pq.read_table(root / "selection" / method / "selected.parquet").to_pylist()
        out[method] = {
            "ids": [r["id"] for r in rows],
            "new_features": [r["new_features"] for r in rows],
            "gains": [None if r["score"] is None else round(r["score"], 4) for r in rows],
        }
    report = json.loads((root / "fac" / "report.json").read_text())
    out["fac_measure"] = {k: report[k] for k in ("fac", "n_in_anchor", "n_covered", "missing")}
    return out


def test_every_method_and_the_fac_measure_pick_what_they_picked_before_the_refactor(
    ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path
):
    cfg = RunConfig.model_validate(golden_config(tmp_path, tiny_model_dir, tiny_sae_dir))
    run(cfg, until="select")
    run(cfg, until="fac")
    got = captured(tmp_path / "out")
    assert all(got[m]["ids"] for m in METHODS), {m: len(got[m]["ids"]) for m in METHODS}
    if os.environ.get("RAYSEL_FREEZE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden outputs refrozen")
    assert got == json.loads(GOLDEN.read_text())
