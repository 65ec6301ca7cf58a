"""`--dry-run` prints what a run would do and writes nothing; a root holding a run of other input
files is refused unless --force."""

import json
import shutil

import yaml

from raysel import cli
from raysel.config import RunConfig
from tests.conftest import build_tiny_sae, write_jsonl


def tree(root) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def config_file(tmp_path, cfg: RunConfig, **sections) -> str:
    raw = cfg.model_dump(mode="json")
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def dry(capsys, *argv) -> tuple[int, dict, str]:
    code = cli.main([*argv, "--dry-run"])
    out = capsys.readouterr().out
    return code, json.loads(out.splitlines()[-1]), out


def test_a_dry_run_of_a_new_root_plans_everything_and_writes_nothing(stats_run, tmp_path, capsys):
    _, cfg, _ = stats_run
    root = tmp_path / "new"
    code, plan, out = dry(capsys, "run", config_file(tmp_path, cfg, output={"root": str(root)}))
    assert code == 0 and not root.exists()
    [f] = plan["input_files"]
    assert f["path"] == cfg.input.paths[0] and f["bytes"] == plan["input_bytes"] > 0
    assert plan["root_note"] == "empty: a new run"
    assert plan["stages"]["prepare"]["action"] == "run"
    encode = plan["stages"]["encode"]
    assert encode["shards"] == "all: prepare runs first"
    assert encode["resources"] == {"actors": cfg.encode.actors, "batch_size": 1, "num_cpus": cfg.encode.num_cpus,
                                   "memory": int(cfg.encode.memory_gb * 2**30)}  # fmt: skip
    assert plan["checks"]["d_in"] == 64 and plan["checks"]["layer"] == 1 and plan["checks"]["model"].startswith("ok")
    assert list(plan["stages"]) == ["prepare", "encode", "tau", "stats", "select", "spans", "report"]
    assert plan["stages"]["stats"]["action"].startswith("run after encode, tau")
    assert set(plan["stages"]["select"]["methods"]) == {"coverage", "random", "longest"}
    assert "nothing written" in out
    # what a GPU config will ask for, on this machine without a GPU (it once showed the cluster's GPUs)
    gpu = config_file(tmp_path, cfg, output={"root": str(root)}, encode={"num_gpus": 1})
    assert dry(capsys, "encode", gpu)[1]["stages"]["encode"]["resources"]["num_gpus"] == 1


def test_a_dry_run_of_a_run_in_progress_counts_the_shards_left(stats_run, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(stats_run[0], root)
    markers = sorted((root / "features" / "_done").glob("*.json"))
    markers[0].unlink()
    before = tree(root)
    code, plan, _ = dry(capsys, "encode", config_file(tmp_path, stats_run[1], output={"root": str(root)}))
    assert code == 0 and tree(root) == before
    assert plan["root_note"].startswith("holds a run of this input")
    assert plan["stages"]["prepare"]["action"].startswith("skip")
    encode = plan["stages"]["encode"]
    assert (encode["shards_to_do"], encode["shards_to_skip"], encode["samples"]) == (1, len(markers) - 1, 40)
    assert "stats" not in plan["stages"] and "shards_of_another_config" not in encode
    # another dtype: the shards a real run would refuse to remove, and the part that differs
    other = config_file(tmp_path, stats_run[1], output={"root": str(root)}, model={"dtype": "bfloat16"})
    assert dry(capsys, "encode", other)[1]["stages"]["encode"]["shards_of_another_config"] == (
        f"{len(markers) - 1}, under another dtype: the run stops unless --force"
    )


def test_a_dry_run_asks_each_stage_its_key(stats_run, tmp_path, capsys):
    """The dry run once printed a constant for tau and stats; now a finished stage is skipped only when
    its marker holds the key the stage gives now, so a changed stats.top_n shows stats (alone) to run."""
    root = tmp_path / "run"
    shutil.copytree(stats_run[0], root)
    code, plan, _ = dry(capsys, "run", config_file(tmp_path, stats_run[1], output={"root": str(root)}))
    assert code == 0
    assert [plan["stages"][s]["action"] for s in ("prepare", "encode", "tau", "stats")] == ["skip (up to date)"] * 4
    assert plan["stages"]["select"]["action"] == "run"
    changed = config_file(tmp_path, stats_run[1], output={"root": str(root)}, stats={"top_n": 3})
    _, plan, _ = dry(capsys, "run", changed)
    assert plan["stages"]["tau"]["action"] == "skip (up to date)" and plan["stages"]["stats"]["action"] == "run"


def test_an_sae_that_does_not_fit_the_model_fails_the_dry_run(stats_run, tmp_path, capsys):
    narrow = build_tiny_sae(tmp_path / "sae", d_in=32)
    code, plan, _ = dry(capsys, "run", config_file(tmp_path, stats_run[1], sae={"path": str(narrow)},
                                                   output={"root": str(tmp_path / "o")}))  # fmt: skip
    assert code == 4 and plan["checks"]["model"].startswith("MISMATCH") and "d_in" in plan["checks"]["model"]


def test_a_root_holding_a_run_of_other_input_is_refused_unless_forced(stats_run, tmp_path, capsys):
    from raysel.core.storage import Storage
    from raysel.stages.prepare import check_root

    root = tmp_path / "run"
    shutil.copytree(stats_run[0], root)
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "another corpus"}])
    config = config_file(tmp_path, stats_run[1], input={"paths": [str(other)]}, output={"root": str(root)})
    before = tree(root)
    assert cli.main(["run", config]) == 3
    err = capsys.readouterr().err
    assert f"output.root: {root} holds a run of other input files" in err and "--force" in err
    assert tree(root) == before
    code, plan, _ = dry(capsys, "run", config)
    assert code == 4 and plan["root_note"].startswith("REFUSED")
    storage = Storage(str(root), stats_run[1].s3)
    check_root(storage, [str(other)], force=True)  # forced: no error
    check_root(storage, stats_run[1].input.paths, force=False)  # the same input: a resume, no error


def test_every_verb_that_runs_stages_targets_stages_of_the_plan():
    """The CLI's verbs and the plan's targets are one list: a verb added to the parser without its
    targets in pipeline.VERBS (or the reverse) fails here, not at a user's first run."""
    from raysel.cli import build_parser
    from raysel.pipeline import STAGES, VERBS

    parser = build_parser()
    verbs = set(next(a for a in parser._actions if a.dest == "verb").choices)
    assert verbs - {"status", "push", "export", "config"} == set(VERBS)  # they read a run or a config
    assert all(VERBS[v] and set(VERBS[v]) <= set(STAGES) for v in VERBS)
