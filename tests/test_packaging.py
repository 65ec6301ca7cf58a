"""What `pip install .` ships: every folder of Python modules under raysel/ is a package that
setuptools finds (a folder without __init__.py imports from a checkout but is left out of a
wheel, and so out of the cluster image)."""

from setuptools import find_packages

from tests.conftest import REPO


def test_every_module_folder_is_a_package_the_build_finds():
    folders = {p.parent for p in (REPO / "raysel").rglob("*.py") if "__pycache__" not in p.parts}
    expected = {".".join(f.relative_to(REPO).parts) for f in folders}
    assert {"raysel", "raysel.core", "raysel.stages", "raysel.methods"} <= expected
    assert set(find_packages(str(REPO), include=["raysel*"])) == expected
