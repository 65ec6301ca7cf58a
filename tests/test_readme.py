"""The README stays true: every config key is documented, and CI runs the README's test command."""

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


def test_every_config_key_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    missing = [k for k in config_keys(RunConfig) if f"| `{k}` |" not in readme]
    assert not missing, f"README's config reference lacks {missing}"


def test_ci_runs_the_readme_test_command():
    assert "make test " in (REPO / "README.md").read_text()
    commands = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert commands == ["make test"]
