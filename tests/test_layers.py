"""The layers' rules, read from the source (docs/architecture.md): the model code imports
nothing of the pipeline, modules and functions stay readable in size, and no two modules import
each other (directly or around a loop, lazily inside a function included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from taac_dagster.code_versions import from_module

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("taac_dagster", "assets", "models")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def type_checking_only(tree: ast.AST) -> set[int]:
    """Nodes under ``if TYPE_CHECKING:``: imports for annotations, which never run."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            inside.update(id(child) for statement in node.body for child in ast.walk(statement))
    return inside


def imported_modules(name: str, path: Path, known: set[str], *, annotations: bool = False) -> set[str]:
    """Project modules ``name`` imports anywhere in its file, a function's lazy import included,
    annotation-only ones when ``annotations`` (a ``from package import module`` counts as the
    module; a ``from module import name`` as the module)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    skipped = set() if annotations else type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = from_module(node, name, is_package)
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known)
    found.discard(name)
    return found


def import_graph(*, annotations: bool = False) -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known, annotations=annotations) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_model_code_imports_nothing_of_the_pipeline():
    graph = import_graph(annotations=True)  # not even for a type
    leaks = {name: sorted(t for t in targets if not t.startswith("models"))
             for name, targets in graph.items() if name.startswith("models")}
    assert {name: targets for name, targets in leaks.items() if targets} == {}


def test_no_two_modules_import_each_other():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_loop_of_three():
    # The rule above can only fail if this finds a loop: a -> b -> c -> a, and d outside it.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [["a", "b", "c"]]


def test_no_module_is_longer_than_a_few_screens():
    lengths = {name: len(path.read_text().splitlines()) for name, path in project_modules().items()}
    assert {name: lines for name, lines in lengths.items() if lines > MAX_MODULE_LINES} == {}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_longer_than_a_screen(package):
    long = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{module_name(path)}.{node.name}"] = lines
    assert long == {}


def test_a_package_import_of_a_submodule_counts_as_that_module(tmp_path, monkeypatch):
    # `from models import encoder` is an import of models.encoder, not of the package.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    (tmp_path / "models" / "encoder.py").write_text("")
    user = tmp_path / "models" / "user.py"
    user.write_text("from models import encoder\nfrom . import encoder as again\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert imported_modules("models.user", user, {"models", "models.encoder", "models.user"}) == {"models.encoder"}
