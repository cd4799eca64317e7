"""What a check is given and what it returns: the warehouse connection with the sampling
modulus and the raw source (``CheckContext``), and ``CheckOutcome``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from taac_dagster.readers.locate import user_sources

ERROR, WARN = "ERROR", "WARN"
# How many offending ids a message names.
NAMED = 5


@dataclass
class CheckOutcome:
    name: str
    table: str
    passed: bool
    severity: str
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what failed, in words, naming ids and sources

    def __post_init__(self) -> None:
        if self.problems:
            self.description = f"{self.description}. FAILED: " + "; ".join(self.problems)


@dataclass(frozen=True)
class CheckSpec:
    name: str
    table: str
    description: str
    severity: str
    run: Callable[[CheckContext], CheckOutcome]


@dataclass
class CheckContext:
    con: duckdb.DuckDBPyConnection
    track: str
    max_history: int
    modulus: int
    embedding_files: list[tuple[int, int, str]]  # (family, dim, path)
    source_root: Path | None = None  # the raw dataset the warehouse was built from
    dataset_format: str | None = None

    def frame(self, sql: str, params: list | None = None) -> pd.DataFrame:
        return self.con.execute(sql, params or []).df()

    def count(self, sql: str, params: list | None = None) -> int:
        return int(self.con.execute(sql, params or []).fetchall()[0][0])

    def rows(self, sql: str, params: list | None = None) -> list[tuple]:
        return self.con.execute(sql, params or []).fetchall()

    def users_where(self, user_ids: list[int]) -> str:
        """``user 7 (<file> line 3, <file> line 9), user 12 (...)``: each user and its source lines."""
        places = user_sources(self.con, self.source_root, self.dataset_format, user_ids)
        return ", ".join(f"user {u}" + (f" ({places[u]})" if u in places else "") for u in user_ids)

    @property
    def source_text(self) -> str:
        return str(self.source_root) if self.source_root else "the raw dataset"


def named(ids: list[Any], total: int) -> str:
    more = f" and {total - len(ids)} more" if total > len(ids) else ""
    return ", ".join(str(i) for i in ids) + more


def empty_problem(ctx: CheckContext, table: str, why: str) -> str | None:
    """A problem when ``table`` has no rows (the chain needs it), else None."""
    if ctx.count(f"SELECT count(*) FROM {table}"):
        return None
    return f"table {table} is empty: {why} (source {ctx.source_text})"
