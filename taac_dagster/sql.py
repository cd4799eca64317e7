"""Load the DuckDB SQL in ``sql/`` by name, filling ``{placeholders}`` from code-made values."""

from __future__ import annotations

import hashlib
import re

from taac_dagster.settings import PROJECT_ROOT

SQL_DIR = PROJECT_ROOT / "sql"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def sql_path(name: str):
    path = SQL_DIR / f"{name}.sql"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SQL_DIR.glob("*.sql")))
        raise FileNotFoundError(f"no SQL file {path}; known: {known}")
    return path


def load_sql(name: str, **params: object) -> str:
    text = sql_path(name).read_text()

    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in params:
            raise KeyError(f"{sql_path(name)} needs the parameter {key!r}")
        return str(params[key])

    return _PLACEHOLDER.sub(fill, text)


def sql_fingerprint(*names: str) -> str:
    """Short hash of the named SQL files: part of the code version of assets that run them."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(sql_path(name).read_bytes())
    return digest.hexdigest()[:12]


def sql_literal(value: object) -> str:
    """``value`` as a SQL string literal (quotes doubled): for paths in statements that take no
    parameters (COPY ... TO, table functions built into a larger query)."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_literal_list(values: list) -> str:
    """A DuckDB list literal of string literals: ``['a', 'b''s']``."""
    return "[" + ", ".join(sql_literal(v) for v in values) + "]"
