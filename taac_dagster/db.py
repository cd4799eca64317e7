"""DuckDB connections with the project's memory and thread settings.

Every connection the project opens goes through ``connect``: DuckDB's own default memory limit
is 80% of the machine's RAM per connection, which a step that opens several (the warehouse
build, its checks, the arrays) would multiply. The settings travel as DuckDB config values,
never as SQL text, so nothing a user sets can change a statement.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

if TYPE_CHECKING:
    from taac_dagster.settings import TaacSettings


def duckdb_config(
    settings: TaacSettings | None = None, *, spill_dir: Path | None = None, writing: bool = False
) -> dict[str, Any]:
    """The DuckDB config of a connection: memory limit and threads from ``settings`` (the
    documented defaults when None), plus the spill folder and unordered inserts for writers."""
    if settings is None:
        from taac_dagster.settings import TaacSettings

        settings = TaacSettings()
    config: dict[str, Any] = {"memory_limit": settings.duckdb_memory_limit}
    if settings.duckdb_threads:
        config["threads"] = int(settings.duckdb_threads)
    if spill_dir is not None:
        config["temp_directory"] = str(spill_dir)
    if writing:
        # Row order inside a table is never relied on (every query orders what it needs), and
        # keeping it costs memory on large inserts.
        config["preserve_insertion_order"] = False
    return config


def connect(
    path: str | Path | None = None,
    settings: TaacSettings | None = None,
    *,
    read_only: bool = False,
    spill_dir: Path | None = None,
) -> duckdb.DuckDBPyConnection:
    """A connection to the DuckDB file ``path`` (in memory when None) with ``settings``'
    memory limit and threads; ``spill_dir`` is where a writer spills what does not fit."""
    writing = not read_only
    if spill_dir is not None:
        spill_dir.mkdir(parents=True, exist_ok=True)
    config = duckdb_config(settings, spill_dir=spill_dir, writing=writing)
    database = ":memory:" if path is None else str(path)
    return duckdb.connect(database, read_only=read_only, config=config)
