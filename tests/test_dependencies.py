"""Every third-party package the code imports is declared in pyproject.toml, and every declared one is used."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from tests.conftest import ROOT


def imported_distributions() -> set[str]:
    modules = set()
    for path in (ROOT / "crnn_art").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"crnn_art"}
    owners = importlib.metadata.packages_distributions()
    missing = [m for m in modules if m not in owners]
    assert not missing, f"imported but not installed: {missing}"
    return {normalise(owners[m][0]) for m in modules}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_imports_and_declared_dependencies_are_the_same_set():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {normalise(re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    imported = imported_distributions()
    assert imported - declared == set(), "imported but not declared in pyproject.toml"
    assert declared - imported == set(), "declared in pyproject.toml but never imported"
