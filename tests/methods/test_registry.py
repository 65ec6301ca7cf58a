"""The registry is the one list of methods: the config accepts exactly its names, each entry
validates its own settings, and the docs document every one."""

import re
from pathlib import Path

import pytest

from raysel.config import ConfigError, load_config
from raysel.methods import METHODS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def config(methods: str):
    return load_config(None, ['input.paths=["x"]', "fac.anchor=[a.jsonl]", f"select.methods={methods}"])


def test_the_config_accepts_every_registered_name_and_only_those():
    # the methods that need no setting of their own go by name alone
    plain = [n for n, m in METHODS.items() if not any(f.is_required() for f in m.Config.model_fields.values())]
    assert {"coverage", "random", "kcenter"} <= set(plain)
    assert [e.name for e in config(f"[{', '.join(plain)}]").select.methods] == plain
    with pytest.raises(ConfigError) as err:
        config("[coverage, nonesuch]")
    assert "select.methods.1" in str(err.value) and all(f"'{n}'" in str(err.value) for n in METHODS)


def test_an_entry_is_checked_by_its_own_config():
    with pytest.raises(ConfigError, match=r"select.methods.0.mona.targets: Field required"):
        config("[mona]")
    with pytest.raises(ConfigError, match=r"select.methods.0.kcenter.pooling: .*'mean', 'sum' or 'max'"):
        config("[{name: kcenter, pooling: median}]")
    with pytest.raises(
        ConfigError, match=r"select.methods.0.coverage.idff: unknown key \(allowed keys: name, budget, idf"
    ):
        config("[{name: coverage, idff: true}]")
    with pytest.raises(ConfigError, match="coverage listed twice"):
        config("[coverage, random, coverage]")


def test_the_docs_example_method_runs_against_the_real_interface():
    import numpy as np

    from raysel.methods import Pool

    code = re.search(
        r"```python\n(# raysel/methods/shortest.py\n.*?)```", (DOCS / "architecture.md").read_text(), re.S
    ).group(1)
    scope: dict = {}
    exec(compile(code, "docs/architecture.md", "exec"), scope)
    pool = Pool(
        np.array(["a", "b", "c", "d"], dtype=object),
        np.zeros(5, np.int64),
        np.zeros(0, np.int64),
        np.array([30, 5, 12, 5]),
        store=None,
    )
    picks = scope["Shortest"](scope["ShortestConfig"]()).pick(pool, 3, ctx=None)
    assert picks.ids == ["b", "d", "c"] and np.isnan(picks.scores).all()
