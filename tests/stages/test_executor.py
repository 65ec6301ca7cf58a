"""The executor: the needs closure in plan order, a skip for every stage whose marker holds the key it
gives now, a rerun for one whose own settings or needed records changed, and no marker for a stage
that crashed. Toy stages on a real local output root; no Ray is needed for the mechanism."""

import pytest

from raysel.config import RunConfig
from raysel.core.storage import Storage
from raysel.stages.base import Executor, Stage


class Toy(Stage):
    def __init__(self, name: str, needs: tuple[str, ...], storage: Storage, calls: list, setting: int = 0):
        self.name, self.needs, self.storage, self.calls, self.setting = name, needs, storage, calls, setting
        self.fail = False

    def key(self, done):
        # its own setting and what it was given: a changed input changes its key
        return {"setting": self.setting, "inputs": {n: done[n]["value"] for n in self.needs}}

    def run(self, done):
        self.calls.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} crashed")
        return {"value": self.setting + sum(done[n]["value"] for n in self.needs)}


@pytest.fixture
def plan(tmp_path):
    storage, calls = Storage(str(tmp_path / "out"), RunConfig.model_validate({"input": {"paths": ["-"]}}).s3), []
    stages = {
        "a": Toy("a", (), storage, calls),
        "b": Toy("b", ("a",), storage, calls, setting=1),
        "c": Toy("c", ("b",), storage, calls),
        "d": Toy("d", ("a",), storage, calls, setting=5),
    }
    return stages, calls, tmp_path / "out" / "stages"


def test_the_closure_runs_in_plan_order_and_stops_at_the_targets(plan):
    stages, calls, markers = plan
    done = Executor(list(stages.values())).run(["c"])
    assert calls == ["a", "b", "c"] and set(done) == {"a", "b", "c"}  # d is not needed
    assert done["c"]["value"] == 1 and "seconds" in done["c"]  # the executor times every stage
    assert sorted(p.stem for p in markers.glob("*.json")) == ["a", "b", "c"]


def test_a_stage_whose_needs_changed_reruns_and_one_whose_needs_did_not_is_skipped(plan):
    stages, calls, _ = plan
    Executor(list(stages.values())).run(["c", "d"])
    calls.clear()
    Executor(list(stages.values())).run(["c", "d"])
    assert calls == []  # everything up to date
    stages["b"].setting = 2  # b's own setting: b reruns, and c, which needs b's changed record
    done = Executor(list(stages.values())).run(["c", "d"])
    assert calls == ["b", "c"] and done["c"]["value"] == 2  # a and d (needing only a) are skipped


def test_a_crash_mid_stage_leaves_no_marker_and_the_rerun_does_only_what_is_left(plan):
    stages, calls, markers = plan
    stages["c"].fail = True
    with pytest.raises(RuntimeError, match="c crashed"):
        Executor(list(stages.values())).run(["c"])
    assert sorted(p.stem for p in markers.glob("*.json")) == ["a", "b"]
    stages["c"].fail = False
    calls.clear()
    Executor(list(stages.values())).run(["c"])
    assert calls == ["c"]


def test_given_records_stand_for_their_stages(plan):
    stages, calls, _ = plan
    done = Executor(list(stages.values()), given={"a": {"value": 10}, "b": {"value": 11}}).run(["c"])
    assert calls == ["c"] and done["c"]["value"] == 11


def test_a_used_stage_is_read_when_it_ran_or_was_given_and_never_run_for_its_reader(plan):
    """`uses` (the report's evaluate panel): catches a reader that pulls the costly stage into every
    run, or that never sees its record."""
    stages, calls, _ = plan

    class Reader(Toy):
        uses = ("d",)

        def run(self, done):
            return {"value": done.get("d", {"value": -1})["value"]}

    stages["r"] = Reader("r", ("a",), stages["a"].storage, calls)
    stages["r"].key = lambda done: None  # always runs, like the report
    assert Executor(list(stages.values())).run(["r"])["r"]["value"] == -1 and "d" not in calls
    assert Executor(list(stages.values())).run(["d", "r"])["r"]["value"] == 5
    assert Executor(list(stages.values()), given={"d": {"value": 7}}).run(["r"])["r"]["value"] == 7


def test_an_unknown_target_names_the_plans_stages(plan):
    stages, _, _ = plan
    with pytest.raises(KeyError, match="no stage named 'z' in the plan \\(a, b, c, d\\)"):
        Executor(list(stages.values())).run(["z"])


def test_the_docs_example_stage_runs_in_the_plan(stats_run, tmp_path):
    """docs/architecture.md's "Adding a stage": its code, executed as written, placed after prepare in
    the real plan."""
    import json
    import re
    import shutil
    from pathlib import Path

    from raysel.pipeline import SideSets, Target, build

    docs = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n(# raysel/stages/source_counts.py\n.*?)```", docs, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "docs/architecture.md", "exec"), scope)
    root, cfg, manifest = stats_run
    shutil.copytree(root, tmp_path / "run")
    storage = Storage(str(tmp_path / "run"), cfg.s3)
    stages = build(Target(cfg, storage, SideSets(cfg, storage)))
    example = scope["SourceCounts"](storage)
    stages.insert(1, example)
    done = Executor(stages).run(["source_counts"])
    counts = json.loads((tmp_path / "run" / "source_counts.json").read_text())
    assert list(counts) == cfg.input.paths and sum(counts.values()) == manifest["stages"]["prepare"]["n_valid"] == 40
    assert done["source_counts"]["n_sources"] == 1 and "seconds" in done["source_counts"]
    marker = (tmp_path / "run" / "stages" / "source_counts.json").stat().st_mtime_ns
    Executor(stages).run(["source_counts"])
    assert (tmp_path / "run" / "stages" / "source_counts.json").stat().st_mtime_ns == marker  # skipped
