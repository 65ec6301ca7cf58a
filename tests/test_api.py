"""raysel.run from Python with the input in memory: a datasets.Dataset or a Ray Dataset."""

import json

import datasets
import pyarrow.parquet as pq

import raysel
from tests.conftest import DEMO, run_cfg


def test_a_run_from_an_in_memory_dataset_stages_its_rows_once(ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path):
    """Would catch: data= losing to the config's input.paths, a digest that follows the block layout
    (the same rows as a Ray Dataset in other blocks and order staged again, and the root then refused
    as holding other input), or a second run that prepares again."""
    import ray.data

    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:24]]
    raw = run_cfg(tmp_path, tiny_model_dir, tiny_sae_dir, 3)  # its 3-row corpus file must not be read
    raw["select"] = {"methods": ["coverage"], "budget": 5}
    raw["output"]["report"] = False
    first = raysel.run(raw, data=datasets.Dataset.from_list(rows))
    assert first.manifest["counts"]["n_input"] == 24 and first.manifest["counts"]["n_encoded"] == 24
    assert set(first.selection("coverage")["id"]) <= {r["id"] for r in rows}
    staged = sorted(p.name for p in (tmp_path / "out" / "input").iterdir())
    assert len(staged) == 2 and staged[1] == staged[0] + ".json"  # the rows' folder and its marker
    prepared = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "prepared").iterdir()}

    again = raysel.run(raw, data=ray.data.from_items(rows[::-1]).repartition(3))
    assert sorted(p.name for p in (tmp_path / "out" / "input").iterdir()) == staged
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "prepared").iterdir()} == prepared
    assert again.selection("coverage")["id"] == first.selection("coverage")["id"]
    assert pq.read_table(tmp_path / "out" / "input" / staged[0]).num_rows == 24
