"""Code rules that keep the layers apart (STYLE.md): synth_core never imports Prefect; every module says
what it does; heavy libraries are not imported at the top of the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["synth_core", "tasks", "flows"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_synth_core_never_imports_prefect_or_upper_layers():
    for path in (ROOT / "synth_core").rglob("*.py"):
        bad = _imports(path) & {"prefect", "tasks", "flows"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_tasks_never_import_flows():
    for path in (ROOT / "tasks").rglob("*.py"):
        assert "flows" not in _imports(path), path


def test_every_module_has_a_docstring():
    for pkg in PACKAGES + ["bench"]:
        for path in (ROOT / pkg).rglob("*.py"):
            assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(ROOT)} has no docstring"


def test_importing_the_cli_touches_no_heavy_library():
    code = (
        "import sys, flows.cli; "
        "heavy = {'torch', 'vllm', 'transformers', 'prefect', 'pyarrow', 'datasets'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout.strip() == "[]"
