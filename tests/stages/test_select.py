"""The select stage end to end on a real local Ray cluster (tiny model and SAE):
what it writes under selection/<method>/ and that coverage beats its baselines."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysel import cli
from raysel.cli import summary_lines
from raysel.config import RunConfig
from raysel.core.features import FeatureStore, calibrate_tau
from raysel.core.storage import S3Config, Storage
from raysel.pipeline import run
from raysel.stages.select import coverage_curve, resolve_budget
from tests.conftest import DEMO, fac_reference, run_cfg, write_jsonl

METHODS = ["coverage", "simscale", "random", "longest", "kcenter"]


def test_budget_is_a_count_or_a_fraction():
    assert (resolve_budget(10, 100), resolve_budget(0.25, 100), resolve_budget(0.001, 100)) == (10, 25, 1)
    assert resolve_budget(500, 100) == 100


def test_the_coverage_curve_counts_each_feature_at_the_pick_that_first_covers_it():
    # rows: {0, 1}, {1, 2}, {}, {3}, {0, 5}; picked 1, 0, 2, 3: row 4 unpicked, so 4 of the 5 are covered
    indptr, indices = np.array([0, 2, 4, 4, 5, 7]), np.array([0, 1, 1, 2, 3, 0, 5], np.int32)
    new, curve = coverage_curve(np.array([1, 0, 2, 3]), indptr, indices, total=5, points=4)
    assert new.tolist() == [2, 1, 0, 1]
    assert curve == [
        {"k": 1, "coverage": 0.4},
        {"k": 2, "coverage": 0.6},
        {"k": 3, "coverage": 0.6},
        {"k": 4, "coverage": 0.8},
    ]


@pytest.fixture(scope="module")
def selected_run(ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("select")
    raw = run_cfg(tmp, tiny_model_dir, tiny_sae_dir, 60)
    raw["select"] = {"budget": 12, "methods": METHODS}
    manifest = run(RunConfig.model_validate(raw), until="select")
    corpus = {r["id"]: r for r in map(json.loads, (tmp / "corpus.jsonl").read_text().splitlines())}
    return tmp / "out", manifest, corpus


@pytest.mark.parametrize("method", METHODS)
def test_each_method_writes_ids_records_and_a_manifest(selected_run, method):
    root, run_manifest, corpus = selected_run
    base = root / "selection" / method
    selected = pq.read_table(base / "selected.parquet").to_pylist()
    ids = [r["id"] for r in selected]
    assert [r["rank"] for r in selected] == list(range(1, 13)) and len(set(ids)) == 12
    records = [json.loads(line) for line in (base / "records.jsonl").read_text().splitlines()]
    assert records == [corpus[i] for i in ids]  # the original fields, in selection order
    table = pq.read_table(base / "data/train-00000-of-00001.parquet")
    assert [json.loads(r) for r in table["record"].to_pylist()] == records
    assert table["id"].to_pylist() == ids and table["instruction"].to_pylist() == [r["instruction"] for r in records]
    manifest = json.loads((base / "manifest.json").read_text())
    assert manifest["counts"] == {**run_manifest["counts"], "n_selected": 12}
    assert manifest["fingerprints"]["encode"] == run_manifest["stages"]["encode"]["fingerprint"]
    assert manifest["model"] == run_manifest["config"]["model"]["name"] and manifest["layer"] == 1
    curve = [p["coverage"] for p in manifest["objective_curve"]]
    assert manifest["objective_curve"][-1]["k"] == 12
    assert manifest["coverage_at_budget"][method] == curve[-1]
    assert sum(r["new_features"] for r in selected) > 0
    # each pick carries its 8 strongest features by peak activation, as the store holds them: would
    # catch another row's features (an id lookup off by one), another ranking (feat_sum), or a dropped pick
    store = {r["id"]: r for r in FeatureStore(Storage(str(root), S3Config())).table(ids=ids).to_pylist()}
    for row in table.select(["id", "sae_features"]).to_pylist():
        peaks = store[row["id"]]
        top = sorted(zip(peaks["feat_max"], peaks["feat_ids"]), key=lambda t: (-t[0], t[1]))[:8]
        assert [(f["feature"], f["activation"]) for f in row["sae_features"]] == [(j, pytest.approx(v)) for v, j in top]
    assert table.num_rows == 12 and pq.read_table(base / "selected.parquet")["sae_features"].equals(
        table["sae_features"]
    )


def test_a_selection_loads_as_a_hugging_face_dataset_and_carries_a_card(selected_run, tmp_path):
    import datasets
    import yaml

    root, _, corpus = selected_run
    base = root / "selection" / "coverage"
    ds = datasets.load_dataset(str(base), split="train", cache_dir=str(tmp_path))
    selected = pq.read_table(base / "selected.parquet").to_pylist()
    assert ds["id"] == [r["id"] for r in selected] and ds["rank"] == list(range(1, 13))
    assert ds["score"] == [r["score"] for r in selected] and ds["output"] == [
        corpus[r["id"]]["output"] for r in selected
    ]
    card = (base / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}
    ]
    licences = {corpus[r["id"]]["license"].lower() for r in selected}  # MIT, Apache-2.0, CC-BY-4.0: the Hub's ids
    assert front["license"] == (licences.pop() if len(licences) == 1 else "other")
    assert front["size_categories"] == ["n<1K"] and front["task_categories"] == ["text-generation"]
    assert "| method | coverage |" in card and "| selected | 12 |" in card and "| encoded pool | 60 |" in card


def test_a_selection_is_in_trls_conversational_format_as_it_is(selected_run, tmp_path, tiny_chat_tokenizer_dir):
    """The bug: a selection held the original fields and a `record` copy only, so mixed alpaca and chat
    input gave a sparse union of columns no trainer reads. Every row now carries `messages`, the
    prepared turns, which TRL's own format check takes and a chat template renders."""
    import datasets
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational

    root, _, corpus = selected_run
    ds = datasets.load_dataset(str(root / "selection" / "coverage"), split="train", cache_dir=str(tmp_path))
    prepared = {
        r["id"]: r["messages"] for r in pq.read_table(root / "prepared", columns=["id", "messages"]).to_pylist()
    }
    assert len(ds) == 12 and all(is_conversational(row) for row in ds)
    assert ds["messages"] == [prepared[i] for i in ds["id"]]
    # alpaca in: its instruction and output are the turns (one without an input, which joins the
    # instruction in the user's turn)
    at = next(n for n, i in enumerate(ds["id"]) if not corpus[i].get("input"))
    row = corpus[ds[at]["id"]]
    assert [m["content"] for m in ds[at]["messages"]][-2:] == [row["instruction"], row["output"]]
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_tokenizer_dir)
    assert row["output"] in tokenizer.apply_chat_template(ds[at]["messages"], tokenize=False)


def test_export_writes_each_format_as_its_trainer_reads_it(selected_run, tmp_path, tiny_chat_tokenizer_dir):
    """`raysel export`: TRL's rows pass TRL's own format check and chat-template step; alpaca and
    sharegpt rows hold every column their LLaMA-Factory dataset_info entry names, in its tags."""
    import datasets
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    root, _, corpus = selected_run
    ids = pq.read_table(root / "selection" / "coverage" / "selected.parquet")["id"].to_pylist()
    rows = {}
    for fmt in ("trl", "alpaca", "sharegpt"):
        assert (
            cli.main(["export", str(root), "--method", "coverage", "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        )
        rows[fmt] = datasets.load_dataset("json", data_files=str(tmp_path / fmt / "train.jsonl"), split="train",
                                          cache_dir=str(tmp_path / "cache")).to_list()  # fmt: skip
        assert len(rows[fmt]) == 12 and json.loads((tmp_path / fmt / "export.json").read_text())["left_out"] == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_tokenizer_dir)
    for row, i in zip(rows["trl"], ids):
        assert is_conversational(row) and corpus[i]["output"] in maybe_apply_chat_template(row, tokenizer)["text"]
    alpaca = json.loads((tmp_path / "alpaca" / "dataset_info.json").read_text())["raysel_coverage"]
    assert alpaca["formatting"] == "alpaca" and alpaca["file_name"] == "train.jsonl"
    for row, i in zip(rows["alpaca"], ids):
        assert set(alpaca["columns"].values()) <= set(row) and row["output"] == corpus[i]["output"]
    share = json.loads((tmp_path / "sharegpt" / "dataset_info.json").read_text())["raysel_coverage"]
    tags = share["tags"]
    for row in rows["sharegpt"]:
        turns = row[share["columns"]["messages"]]
        assert [t[tags["role_tag"]] for t in turns] == [tags["user_tag"], tags["assistant_tag"]] * (len(turns) // 2)


def test_export_keeps_history_and_system_and_leaves_out_what_a_format_cannot_hold():
    from raysel.stages.export import convert

    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]  # fmt: skip
    assert convert(chat, "alpaca") == {"instruction": "u2", "input": "", "output": "a2", "system": "S",
                                       "history": [["u1", "a1"]]}  # fmt: skip
    assert [t["from"] for t in convert(chat, "sharegpt")["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert convert(chat[1:2], "alpaca") is None and convert(chat[2:4], "sharegpt") is None  # no answer; out of order
    assert convert(chat[1:2], "trl") == {"messages": chat[1:2]}


class Hub:
    """Stands in for huggingface_hub.HfApi, which needs the Hub (not reachable here): records the calls
    and loads the folder it is asked to upload, as the Hub's dataset viewer would (by config)."""

    def __init__(self, cache):
        self.calls, self.cache = [], cache

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, folder_path, repo_id, **kwargs):
        import datasets
        import yaml

        self.calls.append(
            ("upload_folder", repo_id, {k: kwargs[k] for k in ("repo_type", "revision", "commit_message")})
        )
        self.files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        card = (Path(folder_path) / "README.md").read_text()
        self.front = yaml.safe_load(card.split("---\n")[1])
        self.loaded = {c["config_name"]: datasets.load_dataset(folder_path, c["config_name"], split="train",
                                                               cache_dir=self.cache) for c in self.front["configs"]}  # fmt: skip


def test_push_uploads_the_data_and_the_card_only_unless_asked(selected_run, tmp_path, capsys):
    """The bug: push uploaded records.jsonl and manifest.json (bucket names, endpoints) beside the data."""
    root = selected_run[0]
    hub = Hub(str(tmp_path))
    args = cli.build_parser().parse_args(
        ["push", str(root), "--method", "simscale", "--repo-id", "org/picked", "--private"]
    )
    assert cli.push(args, api=hub) == 0
    assert hub.calls[0] == ("create_repo", "org/picked", {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert hub.calls[1] == ("upload_folder", "org/picked", {"repo_type": "dataset", "revision": None,
                                                            "commit_message": "raysel selection: simscale"})  # fmt: skip
    assert hub.files == ["README.md", "data/train-00000-of-00001.parquet"]
    ids = pq.read_table(root / "selection" / "simscale" / "selected.parquet")["id"].to_pylist()
    assert hub.loaded["default"]["id"] == ids
    assert "https://huggingface.co/datasets/org/picked" in capsys.readouterr().out
    assert cli.main(["push", str(root), "--method", "nope", "--repo-id", "org/x"]) == 3
    assert "holds no finished selection (methods found: ['coverage', 'kcenter'" in capsys.readouterr().err


def test_push_of_several_methods_makes_one_config_each_on_a_branch(selected_run, tmp_path):
    root = selected_run[0]
    hub = Hub(str(tmp_path))
    argv = ["push", str(root), "--method", "coverage", "--method", "random", "--repo-id", "org/both",
            "--revision", "v1", "--message", "two selections", "--run-files"]  # fmt: skip
    assert cli.push(cli.build_parser().parse_args(argv), api=hub) == 0
    assert ("create_branch", "org/both", {"branch": "v1", "repo_type": "dataset", "exist_ok": True}) in hub.calls
    assert hub.calls[-1][2] == {"repo_type": "dataset", "revision": "v1", "commit_message": "two selections"}
    assert "coverage/manifest.json" in hub.files and "random/records.jsonl" in hub.files
    for method in ("coverage", "random"):
        ids = pq.read_table(root / "selection" / method / "selected.parquet")["id"].to_pylist()
        assert hub.loaded[method]["id"] == ids
    assert (
        hub.front["size_categories"] == ["n<1K"] and hub.front["pretty_name"] == "raysel selections: coverage, random"
    )


def test_coverage_beats_random_and_longest_and_longest_is_longest(selected_run):
    root, _, _ = selected_run
    at_budget = json.loads((root / "selection" / "coverage" / "manifest.json").read_text())["coverage_at_budget"]
    assert at_budget["coverage"] >= at_budget["random"] and at_budget["coverage"] >= at_budget["longest"]
    prepared = {r["id"]: r for r in pq.read_table(root / "prepared").to_pylist()}
    longest = [r["id"] for r in pq.read_table(root / "selection" / "longest" / "selected.parquet").to_pylist()]
    lengths = [prepared[i]["n_response_tokens"] for i in longest]
    assert lengths == sorted(lengths, reverse=True)
    assert min(lengths) >= max(r["n_response_tokens"] for i, r in prepared.items() if i not in longest)
    selected = pq.read_table(root / "selection" / "coverage" / "selected.parquet").to_pylist()
    first = selected[0]  # greedy's first pick is the sample with the most activated features
    assert first["score"] == first["new_features"] == max(r["new_features"] for r in selected)


def test_simscale_keeps_samples_below_its_theta(selected_run):
    root, manifest, _ = selected_run
    store = FeatureStore(Storage(str(root), RunConfig.model_validate(manifest["config"]).s3))
    ids, indptr, indices = store.activated_sets(0.0)
    sets = {i: set(indices[indptr[n] : indptr[n + 1]].tolist()) for n, i in enumerate(ids)}
    theta = json.loads((root / "selection" / "simscale" / "manifest.json").read_text())["theta"]
    kept = [r["id"] for r in pq.read_table(root / "selection" / "simscale" / "selected.parquet").to_pylist()]
    assert 0 < theta <= 1
    for n, a in enumerate(kept):
        for b in kept[:n]:
            assert len(sets[a] & sets[b]) / len(sets[a] | sets[b]) < theta


def test_calibrated_tau_gives_the_target_mean_active_count():
    values = np.random.default_rng(0).gamma(2.0, 1.0, 5000)
    tau = calibrate_tau(values, n_samples=100, target_active=12)
    assert np.count_nonzero(values > tau) == 1200
    assert calibrate_tau(values, n_samples=100, target_active=80) == 0.0  # more than exist: keep all


def test_a_calibrated_tau_is_shared_by_stats_and_select_and_a_finished_select_is_skipped(selected_run, tmp_path):
    root, manifest, _ = selected_run
    shutil.copytree(root, tmp_path / "run")
    cfg = RunConfig.model_validate(
        manifest["config"] | {"activation": {"target_active": 5}, "output": {"root": str(tmp_path / "run")}}
    )
    store = FeatureStore(Storage(cfg.output.root, cfg.s3))
    tau = store.resolve_tau(cfg.activation.tau, cfg.activation.target_active)
    ids, indptr, indices = store.activated_sets(tau)
    assert tau > 0 and len(ids) == 60 and indices.size == 5 * 60

    again = run(cfg, until="select")  # the store is reused; stats and select follow the new tau
    assert again["stages"]["encode"] == manifest["stages"]["encode"]  # skipped by its key, not redone
    doc_freq = pq.read_table(tmp_path / "run" / "stats" / "features.parquet")["doc_freq"].to_numpy()
    assert doc_freq.sum() == indices.size and np.array_equal(doc_freq, np.bincount(indices, minlength=doc_freq.size))
    assert json.loads((tmp_path / "run" / "selection" / "coverage" / "manifest.json").read_text())["tau"] == tau
    assert again["stages"]["select"]["methods"] != manifest["stages"]["select"]["methods"]

    manifest_file = tmp_path / "run" / "selection" / "coverage" / "manifest.json"
    stamp = manifest_file.stat().st_mtime_ns
    third = run(cfg, until="select")
    assert third["stages"]["select"] == again["stages"]["select"] and manifest_file.stat().st_mtime_ns == stamp


def test_the_printed_summary_gives_counts_coverage_per_method_and_the_output(selected_run):
    root, manifest, _ = selected_run
    lines = summary_lines("run", manifest)
    text = "\n".join(lines[:-1])
    assert "60 rows: 60 valid, 0 rejected" in text and "encoded   60 samples" in text
    for method, share in manifest["stages"]["select"]["methods"].items():
        assert any(line.split() == [method, f"{share:.4f}", "(12", "samples)"] for line in lines)
    assert f"outputs   {root}" in text
    assert json.loads(lines[-1])["coverage"] == manifest["stages"]["select"]["methods"]


def test_a_targets_file_edited_in_place_redoes_the_selection(selected_run, tmp_path):
    """The resume key holds the targets' content, not their path, size or time: the same file named
    through a symlink must not redo MONA, and an edit that keeps path, size and time must."""
    import os

    root, manifest, _ = selected_run
    shutil.copytree(root, tmp_path / "run")
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()]
    math = [r for r in demo[60:] if r["category"] == "math"][:6]
    safety = [r for r in demo[60:] if r["category"] == "safety"][:6]
    targets = write_jsonl(tmp_path / "targets.jsonl", math)
    raw = manifest["config"] | {"output": {"root": str(tmp_path / "run")}, "s3": {}}
    raw["select"] = {"budget": 5, "methods": [{"name": "mona", "targets": [str(targets)]}]}
    cfg = RunConfig.model_validate(raw)
    first = run(cfg, until="select")
    selected = tmp_path / "run" / "selection" / "mona" / "selected.parquet"
    picked, stamp = pq.read_table(selected)["id"].to_pylist(), selected.stat().st_mtime_ns

    (tmp_path / "link").symlink_to(tmp_path)
    raw["select"]["methods"][0]["targets"] = [str(tmp_path / "link" / "targets.jsonl")]
    respelled = run(RunConfig.model_validate(raw), until="select")
    assert respelled["stages"]["select"]["key"] == first["stages"]["select"]["key"]
    assert selected.stat().st_mtime_ns == stamp

    stat = targets.stat()
    body = "\n".join(json.dumps(r) for r in safety).encode()
    body = body[: stat.st_size - 1].ljust(stat.st_size - 1) + b"\n"  # the same size, other content
    targets.write_bytes(body)
    os.utime(targets, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same time
    assert targets.stat().st_size == stat.st_size and targets.stat().st_mtime_ns == stat.st_mtime_ns
    second = run(cfg, until="select")
    assert second["stages"]["select"]["key"] != first["stages"]["select"]["key"]
    again = pq.read_table(selected)["id"].to_pylist()
    assert len(again) == 5 and again != picked


def test_the_fac_selection_follows_the_task_features_not_the_reference_bytes(selected_run, tmp_path):
    """`method: fac` reads F through the task_features stage. A reference whose rows are reordered in
    place (same path, size and time) is re-encoded, gives the same F, and the selection is kept; one
    edited so that F changes redoes the selection. Before, the selection keyed on the reference's bytes
    while F itself was cached under a key that never changed."""
    import os

    root, manifest, _ = selected_run
    shutil.copytree(root, tmp_path / "run")
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()]
    anchor_rows = [r for r in demo[60:] if r["category"] == "math"][:6]
    anchor = write_jsonl(tmp_path / "anchor.jsonl", anchor_rows)
    reference = Path(fac_reference(tmp_path))
    raw = manifest["config"] | {"output": {"root": str(tmp_path / "run")}, "s3": {}}
    raw["select"] = {"budget": 5, "methods": ["fac"]}
    raw["fac"] = {"anchor": [str(anchor)], "reference": [str(reference)], "n_features": 20}
    cfg = RunConfig.model_validate(raw)
    first = run(cfg, until="select")["stages"]
    stat, rows = reference.stat(), reference.read_text().splitlines()
    body = "\n".join(rows[len(rows) // 2 :] + rows[: len(rows) // 2]).encode() + b"\n"  # the same bytes, reordered
    reference.write_bytes(body[: stat.st_size])
    os.utime(reference, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert reference.stat().st_size == stat.st_size and reference.stat().st_mtime_ns == stat.st_mtime_ns
    reordered = run(cfg, until="select")["stages"]
    assert reordered["task_features"]["key"] != first["task_features"]["key"]  # recomputed ...
    assert reordered["task_features"]["features"] == first["task_features"]["features"]  # ... the same F
    assert reordered["select"] == first["select"]  # so the selection is kept, marker and all
    reference.write_text("\n".join([json.dumps(r) for r in anchor_rows] + rows[:10]) + "\n")  # F must move
    edited = run(cfg, until="select")["stages"]
    assert edited["task_features"]["features"] != first["task_features"]["features"]
    assert edited["select"]["key"] != first["select"]["key"]


def test_the_memory_check_counts_the_activated_pool_and_refuses_one_too_big(selected_run):
    """Without it a million-row select dies of OOM on the head, hours after the encode, saying nothing."""
    from raysel.stages.select import (
        BYTES_PER_ACTIVATED,
        BYTES_PER_ID_CHAR,
        BYTES_PER_ROW,
        DRIVER_BYTES,
        check_driver_memory,
        mean_record_bytes,
    )

    root, manifest, _ = selected_run
    store = FeatureStore(Storage(str(root), RunConfig.model_validate(manifest["config"]).s3))
    table = store.table(["id", "feat_max"])
    tau = manifest["stages"]["stats"]["tau"]
    activated = sum(sum(v > tau for v in row) for row in table["feat_max"].to_pylist())
    found = check_driver_memory(store.summary(), available=2**40)
    assert (found["rows"], found["activated"]) == (60, activated) and activated > 60
    assert manifest["stages"]["select"]["driver_memory"]["activated"] == activated
    per_row = BYTES_PER_ROW + BYTES_PER_ID_CHAR * store.mean_id_length()
    pool = DRIVER_BYTES + BYTES_PER_ACTIVATED * activated + per_row * 60
    check_driver_memory(store.summary(), available=round(pool) + 1, id_chars=store.mean_id_length())
    with pytest.raises(MemoryError, match="activation.target_active.*select.memory_check: false"):
        check_driver_memory(store.summary(), available=round(pool) - 1, id_chars=store.mean_id_length())
    # an id is held about three times (Arrow, then a Python string), and measured on a sample of them:
    # 40 characters more cost more than 4 B
    assert store.mean_id_length() == pytest.approx(np.mean([len(i) for i in table["id"].to_pylist()]), rel=0.1)
    with pytest.raises(MemoryError):
        check_driver_memory(store.summary(), available=round(pool) + 1, id_chars=store.mean_id_length() + 40)
    # the picks' records, read after the methods: their size from the prepared shards' footers (with
    # the pages' overhead, a few hundred bytes a record in shards this small)
    records = pq.read_table(root / "prepared", columns=["record"])["record"].to_pylist()
    mean = np.mean([len(r.encode()) for r in records])
    assert mean <= mean_record_bytes(store.storage) <= 1.5 * mean


def test_the_memory_check_adds_the_heaviest_method_beside_the_pool(selected_run):
    """kcenter holds every stored entry of the store, not the activated pool: a check that counts the
    pool alone passes a million-row kcenter that then dies of OOM. Methods run one after another, so
    the largest of them counts, not their sum."""
    from raysel.methods.kcenter import BYTES_PER_ROW, BYTES_PER_STORED, KCenter, KCenterConfig
    from raysel.stages.select import check_driver_memory

    root, manifest, _ = selected_run
    store = FeatureStore(Storage(str(root), RunConfig.model_validate(manifest["config"]).s3))
    rows, stored = store.counts()
    kcenter = KCenter(KCenterConfig()).driver_bytes(store, 12, None)
    assert kcenter == BYTES_PER_STORED * stored + BYTES_PER_ROW * rows and stored > rows
    pool = 2**30 * check_driver_memory(store.summary(), available=2**40)["driver_gb"]
    fits = int(pool) + kcenter + 2**20  # the GB figures are rounded: a MB of slack
    found = check_driver_memory(store.summary(), {"kcenter": kcenter, "coverage": 0, "other": kcenter}, fits)
    assert found["methods_gb"] == {"kcenter": round(kcenter / 2**30, 2), "other": round(kcenter / 2**30, 2)}
    with pytest.raises(MemoryError, match=r"beside it, kcenter .* GB.*Leave kcenter out of select.methods"):
        check_driver_memory(store.summary(), {"kcenter": kcenter, "coverage": 0}, int(pool) + kcenter // 2)


def test_coverage_charges_its_greedy_on_one_node_and_only_randgreedis_candidates_when_distributed(selected_run):
    """Catches RandGreeDi charged as the single-node greedy over the whole pool (a 10M select that fits
    refused), or the single-node greedy charged nothing beside the pool; and a refusal that tells a
    coverage run to leave coverage out instead of distributing it."""
    from raysel.methods.coverage import Coverage, CoverageConfig
    from raysel.methods.coverage_kernel import working_bytes
    from raysel.stages.select import check_driver_memory

    root, manifest, _ = selected_run
    store = FeatureStore(Storage(str(root), RunConfig.model_validate(manifest["config"]).s3))
    stats = store.summary()
    one_node = Coverage(CoverageConfig()).driver_bytes(store, 5, None)
    assert one_node == working_bytes(60, round(60 * stats["mean_features_per_sample"])) > 0
    distributed = Coverage(CoverageConfig(distributed="on", partitions=2))
    candidates = working_bytes(10, round(10 * stats["mean_features_per_sample"]))  # 2 partitions of 5 picks
    assert candidates < distributed.driver_bytes(store, 5, None) < one_node
    with pytest.raises(MemoryError, match="Set distributed: on in coverage's entry"):
        check_driver_memory(stats, {"coverage": one_node}, one_node, remedies={"coverage": Coverage.memory_remedy})
