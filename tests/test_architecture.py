"""The shape of the package stays readable: no import cycles (imports inside functions counted), no reaching into
another module's private names, one module that prints with rich, and a command line that answers without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "crnn_art"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.with_suffix("").relative_to(ROOT).parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import | ast.ImportFrom)]


def import_graph() -> dict[str, set[str]]:
    """Module -> the crnn-art modules it imports anywhere in its file (at the top or inside a function)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in imports(path):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name and t != "crnn_art"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of mutually importing modules (strongly connected components with more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycles_counting_imports_inside_functions():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for name, path in modules().items():
        for node in imports(path):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("crnn_art"):
                offenders += [f"{name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_only_the_console_module_imports_rich():
    users = sorted(name for name, path in modules().items()
                   if any((isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "rich")
                          or (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "rich" for a in n.names))
                          for n in imports(path)))
    assert users == ["crnn_art.console"]


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["train", "--help"], ["evaluate", "--help"],
                                  ["train", "--set", "train.lr=abc"], ["train", "--set", "data.task=colour"],
                                  ["train", "--preset", "nope"]])
def test_the_command_line_answers_without_importing_torch(argv):
    code = (f"import sys\nfrom crnn_art.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "NO-TORCH", result.stdout + result.stderr


def test_import_crnn_art_is_lazy_and_still_gives_the_public_names():
    code = ("import sys, crnn_art\nassert 'torch' not in sys.modules\n"
            "from crnn_art import CRNNArtClassifier, ModelLoadError, predict\nprint(CRNNArtClassifier.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "CRNNArtClassifier", result.stderr


FORBIDDEN = {
    # a lower layer never imports a higher one
    "crnn_art.data.": ("crnn_art.training", "crnn_art.evaluation", "crnn_art.hub", "crnn_art.inference",
                       "crnn_art.checkpoints", "crnn_art.model", "crnn_art.bench", "crnn_art.cli"),
    "crnn_art.training.": ("crnn_art.evaluation.evaluate", "crnn_art.evaluation.outliers", "crnn_art.inference",
                           "crnn_art.bench", "crnn_art.cli"),
    "crnn_art.evaluation.": ("crnn_art.training", "crnn_art.inference", "crnn_art.hub", "crnn_art.bench",
                             "crnn_art.cli"),
}
BASE = ("crnn_art.errors", "crnn_art.exits", "crnn_art.console", "crnn_art.config", "crnn_art.runs",
        "crnn_art.runtime", "crnn_art.model")
"""Modules every layer may use; they use no data (but the model its input normalisation), training, evaluation
or command code themselves."""
HIGHER = ("crnn_art.training", "crnn_art.evaluation", "crnn_art.hub", "crnn_art.inference", "crnn_art.cli",
          "crnn_art.bench")


def test_lower_layers_never_import_higher_ones():
    graph = import_graph()
    offenders = []
    for module, targets in graph.items():
        for prefix, banned in FORBIDDEN.items():
            if module.startswith(prefix):
                offenders += [f"{module} -> {t}" for t in targets if t.startswith(banned)]
        if module in BASE:
            offenders += [f"{module} -> {t}" for t in targets if t.startswith(HIGHER)
                          or (t.startswith("crnn_art.data") and t != "crnn_art.data.transforms")]
        offenders += [f"{module} -> {t}" for t in targets
                      if t in ("crnn_art.cli", "crnn_art.launcher") and module != "crnn_art.__main__"]
    assert offenders == []


def test_console_output_that_is_not_a_terminal_is_never_hard_wrapped(capsys):
    from crnn_art.console import make_console

    line = "epoch 1/4 | " + " | ".join(f"figure {i} {i * 1.5:.1f}" for i in range(40))
    make_console().print(line)
    assert capsys.readouterr().out.rstrip("\n") == line  # one line, however long (logs, SLURM, pipes)


def test_every_package_folder_is_a_regular_package_that_git_keeps():
    """A folder without ``__init__.py`` imports from a checkout (a namespace package) but is left out of a built
    wheel (``packages.find``); and a source file git ignores is missing from every clean clone (a ``data/``
    pattern in .gitignore once hid ``crnn_art/data/__init__.py``)."""
    tracked = set(subprocess.run(["git", "ls-files", "crnn_art"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    for folder in {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}:
        assert (folder / "__init__.py").is_file(), f"{folder} has no __init__.py"
    ignored = subprocess.run(["git", "check-ignore", *map(str, PACKAGE.rglob("*.py"))], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert not ignored, f"git ignores {ignored}"
    assert tracked, "run from a git checkout"
