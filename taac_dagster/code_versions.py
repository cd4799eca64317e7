"""Code versions that follow the code: an asset's version is a digest of every project module
its own module imports, directly or through others, plus the data files (SQL, preset YAML) its
step reads. A change to ``models/encoder.py`` thus changes the version of every asset whose
step runs the encoder, and Dagster marks those assets and what is below them stale; nobody has
to remember to bump a string.

The digest is taken over each module's syntax tree without docstrings, so comments, docstrings
and formatting change nothing; code does. Imports are found in the whole file (a function's
lazy import counts) and followed only inside the project's packages.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("taac_dagster", "models", "assets")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of project module ``name`` (a package's ``__init__.py``), None outside."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def from_module(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name of what ``from X import ...`` in ``module`` imports from (relative
    imports resolved against the module, or the package an ``__init__`` is)."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
    return ".".join(p for p in (base, node.module or "") if p)


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            prefix = from_module(node, module, is_package)
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return tree


def _module_info(path: Path, name: str) -> tuple[str, frozenset[str]]:
    """(digest of the code, names it imports) of one module's file, parsed once per content."""
    stat = path.stat()
    return _parsed_module(path, name, stat.st_mtime_ns, stat.st_size)


@cache
def _parsed_module(path: Path, name: str, mtime_ns: int, size: int) -> tuple[str, frozenset[str]]:
    tree = ast.parse(path.read_text())
    imports = frozenset(_imported_names(tree, name, path.name == "__init__.py"))
    digest = hashlib.blake2b(ast.dump(_without_docstrings(tree)).encode(), digest_size=16).hexdigest()
    return digest, imports


def module_closure(roots: Iterable[str], root: Path = ROOT) -> dict[str, Path]:
    """Every project module reachable from ``roots`` by imports: name -> file."""
    found: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if path is None or name in found:
            continue
        found[name] = path
        todo.extend(_module_info(path, name)[1])
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)  # importing a module runs its package's __init__ first
    return found


def code_version(label: str, *modules: str, data_files: Iterable[str] = (), root: Path = ROOT) -> str:
    """``<label>-<digest>`` over the code of ``modules`` and every project module they import, and
    the bytes of ``data_files`` (globs relative to the repository, e.g. ``sql/*.sql``)."""
    digest = hashlib.blake2b(digest_size=6)
    for name, path in sorted(module_closure(modules, root).items()):
        digest.update(f"{name}\0{_module_info(path, name)[0]}\n".encode())
    for pattern in data_files:
        for path in sorted(root.glob(pattern)):
            digest.update(f"{path.relative_to(root).as_posix()}\0".encode() + path.read_bytes())
    return f"{label}-{digest.hexdigest()}"
