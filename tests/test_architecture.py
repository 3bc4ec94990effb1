"""The layout shows the architecture: no import circles, no module importing a higher layer,
no branch on a registered name outside its registry, and modules and functions of a size a
reader can hold. Imports are read with `ast` (every import, also inside functions and
TYPE_CHECKING blocks), so a circle hidden in a function body counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from diversed.methods import METHODS
from diversed.proposers import PROPOSERS
from diversed.runners import BACKENDS

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "diversed"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80

# Coarse layers, lowest first: a module may import its own layer and those below. Within a
# layer, the no-circles test orders modules.
LAYERS = (
    ("library", ""),  # everything not named below
    ("workflows", ("diversed.evaluate", "diversed.train", "diversed.mining")),
    ("fronts", ("diversed.commands", "diversed.server", "diversed.cli", "diversed.integrations")),
)
# Where names are defined (and so compared): the registries.
REGISTRIES = ("diversed.runners", "diversed.proposers", "diversed.methods", "diversed.verifiers", "diversed.gates", "diversed.judge")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The diversed modules a module imports (a package's __init__ for `from . import x` of a name)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer(name: str) -> int:
    for index, (_, prefixes) in reversed(list(enumerate(LAYERS))):
        if prefixes and any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    return 0


def test_the_import_graph_is_read():
    assert "diversed.models" in GRAPH["diversed.calibration"] and "diversed.commands.args" in GRAPH["diversed.commands.generate"]


def test_no_import_circles():
    """Tarjan's strongly connected components: every one must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert circles == []


def test_no_module_imports_a_higher_layer():
    upward = [f"{name} -> {target}" for name, targets in GRAPH.items() for target in targets if layer(target) > layer(name)]
    assert upward == []


def _compared_strings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                for value in values:
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        yield node.lineno, value.value


def test_no_string_branch_on_registered_names_outside_the_registries():
    """Backends, proposers and methods are objects in registries; code elsewhere asks them
    (`pair.backend.can_batch`, `proposer.needs_draft_model`, `needs_draft(method)`) rather
    than comparing names, so adding one stays one module plus one registry line."""
    names = set(BACKENDS) | set(PROPOSERS) | set(METHODS)
    files = [path for name, path in MODULES.items() if not any(name == r or name.startswith(r + ".") for r in REGISTRIES)]
    files += sorted((REPO / "benchmarks").glob("*.py"))
    branches = [f"{path.relative_to(REPO)}:{line}: {text!r}" for path in files
                for line, text in _compared_strings(ast.parse(path.read_text())) if text in names]
    assert branches == []


def test_the_string_branch_check_sees_a_branch():
    assert list(_compared_strings(ast.parse('if backend == "llama.cpp": pass'))) == [(1, "llama.cpp")]
    assert list(_compared_strings(ast.parse('x = proposer in ("ngram", "model")'))) == [(1, "ngram"), (1, "model")]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_small(name):
    text = MODULES[name].read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []
