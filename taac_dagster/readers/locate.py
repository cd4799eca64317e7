"""Where a value in the warehouse came from: the file and line or row of its raw dataset.

The data-quality checks run on the warehouse, after the staging tables are gone; when one
fails, these functions read the raw dataset again (only then) to say which lines or rows hold
the offending users, so the message points at the input, not only at a table.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from taac_dagster.formats import HUB_FORMAT, JSONL_FORMAT
from taac_dagster.readers.hub_parquet import locate_users
from taac_dagster.readers.jsonl import locate_users_jsonl


def user_sources(
    con: duckdb.DuckDBPyConnection, source_root: Path | None, dataset_format: str | None, user_ids: list[int]
) -> dict[int, str]:
    """``user id -> "<file> line 3, <file> line 9"`` (or rows); an unreadable source says so."""
    if not user_ids or source_root is None:
        return {}
    try:
        if dataset_format == HUB_FORMAT:
            found = locate_users(con, source_root / "seq", user_ids)
        elif dataset_format == JSONL_FORMAT:
            found = locate_users_jsonl(con, source_root / "seq.jsonl", user_ids)
        else:
            return {}
    except (duckdb.Error, OSError, ValueError) as exc:
        return {user: f"{source_root} (not readable now: {type(exc).__name__})" for user in user_ids}
    return {user: ", ".join(places[:4]) + (f" and {len(places) - 4} more" if len(places) > 4 else "")
            for user, places in found.items()}
