"""The README stays a newcomer's page and true; the docs hold every config key, and build."""

import subprocess
import sys

from pydantic import BaseModel

from raysel.config import RunConfig
from tests.conftest import REPO


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += config_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_every_config_key_is_in_the_config_reference():
    reference = (REPO / "docs" / "config.md").read_text()
    missing = [k for k in config_keys(RunConfig) if f"| `{k}` |" not in reference]
    assert not missing, f"docs/config.md lacks {missing}"


def test_every_default_in_the_config_reference_is_the_models_own():
    """Would catch docs/config.md drifting from the code: a section's default changed while the
    reference kept the old one. The models are the source; the reference shows each default as YAML
    (a path with ~ as written, before the code expands it)."""
    import os
    import re

    import yaml

    reference, stale = (REPO / "docs" / "config.md").read_text(), []
    for key in config_keys(RunConfig):
        cell = re.search(r"^\| `" + re.escape(key) + r"` \| `([^`]*)` \|", reference, re.M)
        model, *parts, name = [RunConfig, *key.split(".")]
        for part in parts:
            model = model.model_fields[part].annotation
        default = model.model_fields[name].get_default(call_default_factory=True)
        if isinstance(default, list) and default and isinstance(default[0], str | dict):  # select.methods
            default = [e if isinstance(e, str) else e["name"] for e in default]
        shown = cell and yaml.safe_load(cell.group(1))
        if cell is None or (os.path.expanduser(shown) if isinstance(shown, str) else shown) != default:
            stale.append((key, cell and cell.group(1), default))
    assert not stale, f"docs/config.md shows other defaults than the code: {stale}"


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
