"""What `pip install .` ships: every folder of Python modules under raysel/ is a package that
setuptools finds (a folder without __init__.py imports from a checkout but is left out of a
wheel, and so out of the cluster image)."""

import tomllib
from packaging.requirements import Requirement
from setuptools import find_packages

from tests.conftest import REPO


def test_every_module_folder_is_a_package_the_build_finds():
    folders = {p.parent for p in (REPO / "raysel").rglob("*.py") if "__pycache__" not in p.parts}
    expected = {".".join(f.relative_to(REPO).parts) for f in folders}
    assert {"raysel", "raysel.core", "raysel.stages", "raysel.methods"} <= expected
    assert set(find_packages(str(REPO), include=["raysel*"])) == expected


def test_the_ranges_admit_the_tested_set_and_constraints_pin_every_dependency():
    """pyproject.toml states ranges (an exact pin there would refuse to install beside vLLM), and
    constraints.txt, what make, CI and the image install, pins each dependency inside its range."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    assert len(requirements) > 10
    for req in requirements:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {req.specifier}"
        if req in map(Requirement, project["dependencies"]):
            assert not any(s.operator == "==" for s in req.specifier), f"{req}: a range, not a pin"
