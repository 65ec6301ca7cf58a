"""Each layer imports only below it: core < methods < config < stages < pipeline < plan, status, cli, api.
Every import counts, at the top of a module, inside a function or under TYPE_CHECKING, since each is
a way back into the circle config -> methods -> core -> config that this layering removed."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raysel"
ABOVE = {
    "core": ("raysel.config", "raysel.methods", "raysel.stages", "raysel.pipeline", "raysel.plan", "raysel.status",
             "raysel.cli", "raysel.api"),
    "methods": ("raysel.stages", "raysel.pipeline", "raysel.plan", "raysel.status", "raysel.cli", "raysel.api"),
    "stages": ("raysel.pipeline", "raysel.plan", "raysel.status", "raysel.cli", "raysel.api"),
}  # fmt: skip


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_module_imports_a_layer_above_its_own():
    wrong = {}
    for layer, above in ABOVE.items():
        modules = sorted((PACKAGE / layer).glob("*.py"))
        assert len(modules) > 3, layer
        for path in modules:
            bad = sorted(i for i in imports(path) if i.startswith(above))
            if bad:
                wrong[f"{layer}/{path.name}"] = bad
    assert wrong == {}


def test_the_import_reader_sees_imports_in_functions_and_under_type_checking(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from raysel.config import RunConfig\n"
        "def f():\n    import raysel.stages.base\n"
    )
    assert {"raysel.config.RunConfig", "raysel.stages.base"} <= imports(module)


def test_reading_a_config_loads_neither_ray_nor_numba_nor_pandas():
    """The CLI imports the heavy parts only where a verb needs them; a config that pulled them in (1.2 s
    here, most of it Ray Data) made every `raysel status` and `--help` pay for them."""
    import subprocess
    import sys

    code = (
        "import sys, raysel.config; print(sorted(m for m in ('ray', 'numba', 'pandas', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
