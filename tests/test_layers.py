"""The layer contract in pyproject.toml holds, and the command line reaches deployments/ only lazily."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    """`lint-imports` over pyproject.toml: layers by role, no Ray in the core, no cycles."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _top_level_imports(path: Path) -> set[str]:
    """Modules a file imports when it is imported (not inside functions or classes' methods)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_command_line_imports_deployments_and_ray_only_inside_functions():
    heavy = []
    for path in sorted((REPO_ROOT / "rerank" / "cli").glob("*.py")):
        for name in _top_level_imports(path):
            if name.split(".")[0] in ("deployments", "ray"):
                heavy.append(f"{path.name}: {name}")
    assert not heavy, f"import these inside the command's function, so `rerank --help` stays light: {heavy}"
