"""Reader for the Hub release layout (``seq/``, ``user_feat/``, ``item_feat/``, ``candidate/``).

Schemas are checked file by file from the parquet footers (cheap) before DuckDB scans the
data, so a missing or mistyped column is reported with the file it is in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from taac_dagster.errors import DataFormatError
from taac_dagster.formats import (
    INTEGER_TYPE,
    ITEM_SPARSE_FEATURES,
    RAW_ID_TYPE,
    USER_ARRAY_FEATURES,
    USER_SPARSE_FEATURES,
    feature_column,
    is_int64_compatible,
    is_raw_id_type,
    raw_id_sql,
)
from taac_dagster.readers.staging import create_empty_candidates, stage_indexer
from taac_dagster.sql import sql_read_paths

log = logging.getLogger(__name__)

TypeCheck = Callable[[pa.DataType], bool]


def _is_int_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and is_int64_compatible(t.value_type)


def _is_seq(t: pa.DataType) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    fields = {f.name: f.type for f in t.value_type}
    return all(name in fields and is_int64_compatible(fields[name]) for name in ("item_id", "action_type", "timestamp"))


def _is_feature_struct(t: pa.DataType) -> bool:
    if is_int64_compatible(t):
        return True
    if not pa.types.is_struct(t):
        return False
    fields = {f.name: f.type for f in t}
    return "feature_value" in fields and is_int64_compatible(fields["feature_value"])


SEQ_TYPE = "list<struct<item_id: int64, action_type: int64, timestamp: int64>> (integers, not uint64)"


def parquet_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise DataFormatError(folder, "a folder of .parquet files", "no .parquet files")
    return files


def check_schema(
    files: list[Path],
    required: dict[str, tuple[TypeCheck, str]],
    optional: dict[str, tuple[TypeCheck, str]] | None = None,
) -> set[str]:
    """Check every file's schema; return the optional columns present in all files."""
    present: set[str] | None = None
    for path in files:
        try:
            metadata = pq.read_metadata(path)
            schema = metadata.schema.to_arrow_schema()
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataFormatError(path, "a readable parquet file", f"an unreadable file ({exc})") from exc
        if metadata.num_rows == 0:
            raise DataFormatError(path, "a parquet file with at least one row", "an empty file (0 rows)")
        names = set(schema.names)
        for column, (check, described) in required.items():
            if column not in names:
                raise DataFormatError(
                    path, f"column {column!r} of type {described}", f"columns {sorted(names)}"
                )
            if not check(schema.field(column).type):
                raise DataFormatError(
                    path, f"column {column!r} of type {described}", f"type {schema.field(column).type}"
                )
        for column, (check, described) in (optional or {}).items():
            if column in names and not check(schema.field(column).type):
                raise DataFormatError(
                    path, f"column {column!r} of type {described}", f"type {schema.field(column).type}"
                )
        file_optional = {c for c in (optional or {}) if c in names}
        present = file_optional if present is None else present & file_optional
    return present or set()


def files_sql(files: list[Path]) -> str:
    """The files as a DuckDB list literal, read as exactly those files (no glob expansion)."""
    return sql_read_paths(files)


def locate_first(
    con: duckdb.DuckDBPyConnection, files: list[Path], condition: str, expected: str, found: str | None = None
) -> None:
    """Raise a DataFormatError at the first row (file, row) matching ``condition``, if any."""
    rows = con.execute(
        f"""SELECT filename, file_row_number FROM read_parquet({files_sql(files)},
                filename=true, file_row_number=true, union_by_name=true)
            WHERE {condition} ORDER BY filename, file_row_number LIMIT 1"""
    ).fetchall()
    if rows:
        filename, row = rows[0]
        raise DataFormatError(filename, expected, found or f"a row where {condition}", row=int(row))


def locate_bad_raw_id(con: duckdb.DuckDBPyConnection, files: list[Path], column: str) -> None:
    """Raise a DataFormatError at the first row whose raw id ``column`` is neither an integer
    nor a string of digits, naming the file, the row and the value found."""
    rows = con.execute(
        f"""SELECT filename, file_row_number, CAST("{column}" AS VARCHAR)
            FROM read_parquet({files_sql(files)}, filename=true, file_row_number=true, union_by_name=true)
            WHERE "{column}" IS NOT NULL AND {raw_id_sql(f'"{column}"')} IS NULL
            ORDER BY filename, file_row_number LIMIT 1"""
    ).fetchall()
    if rows:
        filename, row, value = rows[0]
        raise DataFormatError(filename, f"column {column!r} holding a raw id ({RAW_ID_TYPE})", repr(value), row=int(row))


_INT: tuple[TypeCheck, str] = (is_int64_compatible, INTEGER_TYPE)
_INT_LIST: tuple[TypeCheck, str] = (_is_int_list, f"list<{INTEGER_TYPE}>")
RAW_ID: tuple[TypeCheck, str] = (is_raw_id_type, RAW_ID_TYPE)


def stage_seq(con: duckdb.DuckDBPyConnection, folder: Path) -> None:
    """``stg_events`` as a view over the files: the events table reads them exactly once."""
    files = parquet_files(folder)
    check_schema(files, {"user_id": _INT, "seq": (_is_seq, SEQ_TYPE)})
    con.execute(
        f"""
        CREATE OR REPLACE VIEW stg_events AS
        SELECT user_id::BIGINT AS user_id, (idx - 1)::INTEGER AS position, ev.item_id::BIGINT AS item_id,
               ev.action_type::BIGINT AS action_type, ev.timestamp::BIGINT AS "timestamp"
        FROM (
            SELECT user_id, unnest(seq) AS ev, generate_subscripts(seq, 1) AS idx
            FROM read_parquet({files_sql(files)}, union_by_name=true)
        )
        """
    )


def diagnose_seq(con: duckdb.DuckDBPyConnection, folder: Path) -> None:
    """Raise at the first row of ``seq/`` with a null user id, item id or timestamp."""
    files = parquet_files(folder)
    locate_first(con, files, "user_id IS NULL", "a non-null user_id", "null")
    locate_first(
        con,
        files,
        "list_count(list_filter(seq, lambda e: e.item_id IS NULL OR e.timestamp IS NULL)) > 0",
        "events with non-null item_id and timestamp",
    )


def locate_event(con: duckdb.DuckDBPyConnection, folder: Path, user_id: int, position: int) -> tuple[str, int] | None:
    """(file, row) of the ``seq/`` row holding ``user_id``'s event at ``position``."""
    rows = con.execute(
        f"""SELECT filename, file_row_number FROM read_parquet({files_sql(parquet_files(folder))},
                filename=true, file_row_number=true, union_by_name=true)
            WHERE user_id = ? AND len(seq) > ? ORDER BY filename, file_row_number LIMIT 1""",
        [user_id, position],
    ).fetchall()
    return (str(rows[0][0]), int(rows[0][1])) if rows else None


def locate_users(con: duckdb.DuckDBPyConnection, folder: Path, user_ids: list[int]) -> dict[int, list[str]]:
    """Where each of ``user_ids`` comes from: ``<file> row <n>`` for every ``seq/`` row of it."""
    rows = con.execute(
        f"""SELECT user_id, filename, file_row_number FROM read_parquet({files_sql(parquet_files(folder))},
                filename=true, file_row_number=true, union_by_name=true)
            WHERE list_contains(?, user_id) ORDER BY filename, file_row_number""",
        [list(user_ids)],
    ).fetchall()
    found: dict[int, list[str]] = {}
    for user, filename, row in rows:
        found.setdefault(int(user), []).append(f"{filename} row {row}")
    return found


def stage_user_features(con: duckdb.DuckDBPyConnection, folder: Path) -> None:
    files = parquet_files(folder)
    optional = {f: _INT for f in USER_SPARSE_FEATURES} | {f: _INT_LIST for f in USER_ARRAY_FEATURES}
    present = check_schema(files, {"user_id": _INT}, optional)
    cols = [
        (f'"{f}"::BIGINT' if f in present else "NULL::BIGINT") + f" AS {feature_column(f)}"
        for f in USER_SPARSE_FEATURES
    ] + [
        (f'"{f}"::BIGINT[]' if f in present else "NULL::BIGINT[]") + f" AS {feature_column(f)}"
        for f in USER_ARRAY_FEATURES
    ]
    con.execute(
        f"""CREATE OR REPLACE TABLE stg_user_features AS
            SELECT user_id::BIGINT AS user_id, {", ".join(cols)}
            FROM read_parquet({files_sql(files)}, union_by_name=true) WHERE user_id IS NOT NULL"""
    )


def stage_item_features(con: duckdb.DuckDBPyConnection, folder: Path) -> None:
    files = parquet_files(folder)
    present = check_schema(files, {"item_id": _INT}, {f: _INT for f in ITEM_SPARSE_FEATURES})
    cols = [
        (f'"{f}"::BIGINT' if f in present else "NULL::BIGINT") + f" AS {feature_column(f)}"
        for f in ITEM_SPARSE_FEATURES
    ]
    locate_first(con, files, "item_id IS NULL", "a non-null item_id", "null")
    con.execute(
        f"""CREATE OR REPLACE TABLE stg_item_features AS
            SELECT item_id::BIGINT AS item_id, {", ".join(cols)}
            FROM read_parquet({files_sql(files)}, union_by_name=true)"""
    )


def stage_candidates(con: duckdb.DuckDBPyConnection, folder: Path) -> None:
    files = parquet_files(folder)
    struct = (_is_feature_struct, "struct<feature_value: int64, cold_start: bool> or integer")
    present = check_schema(
        files, {"item_id": RAW_ID, "retrieval_id": _INT}, {f: struct for f in ITEM_SPARSE_FEATURES}
    )
    schema = pq.read_schema(files[0])
    values, colds = [], []
    for f in ITEM_SPARSE_FEATURES:
        if f not in present:
            values.append(f"NULL::BIGINT AS {feature_column(f)}")
            continue
        if pa.types.is_struct(schema.field(f).type):
            has_cold = "cold_start" in {x.name for x in schema.field(f).type}
            cold = f'coalesce("{f}".cold_start, false)' if has_cold else "false"
            # A cold-start value is not in the vocabulary: keep it out of the id columns.
            values.append(
                f'CASE WHEN {cold} THEN NULL ELSE "{f}".feature_value::BIGINT END AS {feature_column(f)}'
            )
            colds.append(f"{cold}::INTEGER")
        else:
            values.append(f'"{f}"::BIGINT AS {feature_column(f)}')
    cold_sum = " + ".join(colds) if colds else "0"
    locate_first(con, files, "item_id IS NULL OR retrieval_id IS NULL", "non-null item_id and retrieval_id")
    locate_bad_raw_id(con, files, "item_id")
    con.execute(
        f"""CREATE OR REPLACE TABLE stg_candidates AS
            SELECT {raw_id_sql("item_id")} AS creative_id, retrieval_id::BIGINT AS retrieval_id, {", ".join(values)},
                   ({cold_sum})::INTEGER AS cold_features
            FROM read_parquet({files_sql(files)}, union_by_name=true)"""
    )


def stage_hub_dataset(con: duckdb.DuckDBPyConnection, root: Path) -> dict[str, int]:
    vocab = stage_indexer(con, root / "indexer.pkl")
    stage_seq(con, root / "seq")
    for name, stage in (("user_feat", stage_user_features), ("item_feat", stage_item_features)):
        folder = root / name
        if folder.is_dir():
            stage(con, folder)
        else:
            raise DataFormatError(folder, f"a folder of {name} parquet files", "no such folder")
    if (root / "candidate").is_dir():
        stage_candidates(con, root / "candidate")
    else:
        log.info("%s has no candidate/ folder: the candidate pool is built from the items", root)
        create_empty_candidates(con)
    return vocab
