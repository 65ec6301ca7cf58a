"""The README stays a newcomer's page and true; the docs hold every config key, and build."""

import subprocess
import sys

from raysel.config_reference import reference
from tests.conftest import REPO


def test_the_config_reference_is_the_one_the_models_write():
    """Would catch docs/config.md drifting from the code: a key added, renamed or removed, a default or
    a meaning (the field's docstring) changed, or a method registered, without the page rewritten by
    `raysel config --reference > docs/config.md`; and a new field with no docstring (reference() refuses it)."""
    assert (REPO / "docs" / "config.md").read_text() == reference(), "run: raysel config --reference > docs/config.md"


def test_the_readme_is_a_newcomers_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300, "the reference belongs in docs/"
    for page in ("architecture", "running", "config", "data", "evaluate", "faults", "sae", "benchmarks", "testing"):
        assert f"(docs/{page}.md)" in readme, f"the README does not link docs/{page}.md"


def test_the_docs_site_builds_with_every_page_in_its_nav(tmp_path):
    """mkdocs in strict mode: a broken link between pages, or a page left out of the nav, fails it."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "config" / "index.html").is_file() and (tmp_path / "downstream" / "index.html").is_file()


def test_ci_runs_the_readme_test_command():
    assert "make test " in (REPO / "README.md").read_text()
    commands = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert commands == ["make test"]


def test_the_readmes_python_example_runs_as_written(ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path, monkeypatch):
    """The README's Python block, executed as written, on a my-config.yaml of the tiny model: catches
    an API the README promises and the package does not keep (names, return types, overrides)."""
    import re

    import datasets
    import yaml

    from tests.conftest import run_cfg

    raw = run_cfg(tmp_path, tiny_model_dir, tiny_sae_dir, 40)
    raw["select"] = {"methods": ["coverage", "random"]}
    (tmp_path / "my-config.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = True  # the notebook's or script's own
    import raysel.pipeline

    during, executor_run = [], raysel.pipeline.Executor.run
    monkeypatch.setattr(raysel.pipeline.Executor, "run", lambda self, targets: during.append(
        (context.enable_progress_bars, context.print_on_execution_start)) or executor_run(self, targets))  # fmt: skip
    code = re.search(r"```python\n(import raysel\n.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    r, coverage = scope["r"], scope["coverage"]
    assert r.config.select.budget == 0.05 and r.status()["finished"]
    assert isinstance(coverage, datasets.Dataset) and coverage.num_rows == 2  # 5 % of 40
    assert set(coverage["id"]) <= set(r.features().to_pandas()["id"])
    assert r.report_path and r.report_path.endswith("report.html")
    # off a terminal raysel quiets Ray Data's bars while its own datasets run, and only then: they were
    # once switched off for the rest of the process, and only by the call that started Ray
    assert during == [(False, False)]
    assert context.enable_progress_bars and context.print_on_execution_start
