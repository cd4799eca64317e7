"""Load the DuckDB SQL in ``sql/`` by name, filling ``{placeholders}`` from code-made values."""

from __future__ import annotations

import glob
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


def sql_literal(value: object) -> str:
    """``value`` as a SQL string literal (quotes doubled): for paths in statements that take no
    parameters (COPY ... TO); a path a table function reads takes ``sql_read_path``."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_literal_list(values: list) -> str:
    """A DuckDB list literal of string literals: ``['a', 'b''s']``."""
    return "[" + ", ".join(sql_literal(v) for v in values) + "]"


def read_path(path: object) -> str:
    """``path`` as DuckDB's file readers (read_parquet, read_ndjson_objects, ...) must be given it to
    read that one file: they expand ``*``, ``?`` and ``[...]`` in every path, each path of a list
    too, so a data root named ``a[1]`` reads the files of a sibling ``a1`` where it has them.
    glob.escape makes each such character a one-character class (``[[]``) that matches only itself.
    Not for paths written to (COPY ... TO takes the path as it is)."""
    return glob.escape(str(path))


def sql_read_path(path: object) -> str:
    """``path`` as a SQL string literal naming that one file to DuckDB's readers (see read_path)."""
    return sql_literal(read_path(path))


def sql_read_paths(paths: list) -> str:
    """The files as a DuckDB list literal, each naming that one file to DuckDB's readers."""
    return sql_literal_list([read_path(path) for path in paths])
