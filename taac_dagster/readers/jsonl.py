"""Reader for the competition format: ``seq.jsonl`` + ``indexer.pkl`` (+ ``predict_set.jsonl``).

DuckDB parses the file (fast path). When DuckDB rejects it, or the parsed records break the
format, a line-by-line Python pass finds the first offending line so the error names it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import duckdb

from taac_dagster.errors import DataFormatError
from taac_dagster.formats import ITEM_SPARSE_FEATURES, feature_column
from taac_dagster.readers.staging import create_empty_candidates, stage_indexer, user_feature_select

log = logging.getLogger(__name__)

_RECORD = (
    "a JSON list of records [user_id, item_id, user_feature, item_feature, action_type, "
    "timestamp] with integer ids and timestamps"
)


def _sql_str(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def stage_seq_jsonl(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Parse ``seq.jsonl`` into ``stg_events``, ``stg_user_features`` and ``stg_item_features``.

    The file is parsed once: each line becomes a list of records, each record a list of JSON
    values (``JSON[][]``), so no field is parsed twice. Interaction records are moved before
    the user-profile record(s) of their line, which makes their index the event position.
    """
    query = f"""
    CREATE OR REPLACE TABLE stg_jsonl_records AS
    WITH lines AS (
        SELECT CAST(json AS JSON[][]) AS recs FROM read_ndjson_objects({_sql_str(path)})
    ), split AS (
        SELECT list_concat(list_filter(recs, lambda r: r[3] IS NULL),
                           list_filter(recs, lambda r: r[3] IS NOT NULL)) AS recs,
               len(list_filter(recs, lambda r: r[3] IS NULL)) AS n_events
        FROM lines
    ), flat AS (
        SELECT unnest(recs) AS rec, generate_subscripts(recs, 1) AS idx, n_events FROM split
    )
    SELECT
        TRY_CAST(rec[1] AS BIGINT) AS user_id,
        CASE WHEN idx <= n_events THEN (idx - 1)::INTEGER END AS position,
        TRY_CAST(rec[2] AS BIGINT) AS item_id,
        TRY_CAST(rec[5] AS INTEGER) AS action_type,
        TRY_CAST(rec[6] AS BIGINT) AS "timestamp",
        rec[3] AS user_feature,
        rec[4] AS item_feature,
        len(rec) IS DISTINCT FROM 6
            OR TRY_CAST(rec[1] AS BIGINT) IS NULL
            OR (rec[5] IS NOT NULL AND TRY_CAST(rec[5] AS INTEGER) IS NULL) AS malformed
    FROM flat
    """
    try:
        con.execute(query)
    except duckdb.Error as exc:
        diagnose_seq_jsonl(path)  # raises with the line number when it finds the problem
        raise DataFormatError(path, _RECORD, f"a file DuckDB cannot parse ({exc})") from exc

    bad = con.execute(
        """
        SELECT count(*) FROM stg_jsonl_records WHERE malformed
            OR (user_feature IS NULL AND (item_id IS NULL OR "timestamp" IS NULL))
            OR (user_feature IS NOT NULL AND (item_id IS NOT NULL OR json_type(user_feature) <> 'OBJECT'))
        """
    ).fetchall()[0][0]
    if bad:
        diagnose_seq_jsonl(path)
        raise DataFormatError(path, _RECORD, f"{bad} malformed records")

    con.execute(
        """
        CREATE OR REPLACE VIEW stg_events AS
        SELECT user_id, position, item_id, action_type, "timestamp"
        FROM stg_jsonl_records WHERE position IS NOT NULL
        """
    )
    con.execute(
        "CREATE OR REPLACE TABLE stg_user_features AS SELECT user_id, "
        + user_feature_select(
            "(SELECT user_id, any_value(user_feature) AS uf FROM stg_jsonl_records "
            "WHERE position IS NULL GROUP BY user_id)",
            "uf",
        )
    )
    # Features are extracted once per distinct item, not once per record.
    con.execute(
        """
        CREATE OR REPLACE TABLE stg_jsonl_item_json AS
        SELECT item_id, any_value(item_feature) AS item_feature FROM stg_jsonl_records
        WHERE position IS NOT NULL AND item_feature IS NOT NULL GROUP BY item_id
        """
    )
    if con.execute(
        "SELECT count(*) FROM stg_jsonl_item_json WHERE json_type(item_feature) <> 'OBJECT'"
    ).fetchall()[0][0]:
        diagnose_seq_jsonl(path)
    item_cols = ", ".join(
        f"TRY_CAST(item_feature->>'$.\"{f}\"' AS BIGINT) AS {feature_column(f)}" for f in ITEM_SPARSE_FEATURES
    )
    con.execute(
        f"CREATE OR REPLACE TABLE stg_item_features AS SELECT item_id, {item_cols} FROM stg_jsonl_item_json"
    )
    con.execute("DROP TABLE stg_jsonl_item_json")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _record_problem(record: object) -> str | None:
    if not isinstance(record, list):
        return f"a record that is a {type(record).__name__}, not a list"
    if len(record) != 6:
        return f"a record with {len(record)} fields instead of 6: {json.dumps(record)[:120]}"
    user_id, item_id, user_feature, item_feature, action_type, timestamp = record
    if not _is_int(user_id):
        return f"user_id {user_id!r}"
    if user_feature is not None:
        if not isinstance(user_feature, dict):
            return f"user_feature {user_feature!r} (expected an object or null)"
        if item_id is not None:
            return f"a user-profile record with item_id {item_id!r} (expected null)"
        return None
    if not _is_int(item_id):
        return f"item_id {item_id!r} in an interaction record"
    if item_feature is not None and not isinstance(item_feature, dict):
        return f"item_feature {item_feature!r} (expected an object or null)"
    if isinstance(item_feature, dict):
        for key, value in item_feature.items():
            if value is not None and not _is_int(value):
                return f"item feature {key!r} = {value!r} (expected an integer re-id)"
    if action_type is not None and not _is_int(action_type):
        return f"action_type {action_type!r}"
    if not _is_int(timestamp):
        return f"timestamp {timestamp!r}"
    return None


def diagnose_seq_jsonl(path: Path) -> None:
    """Raise a DataFormatError naming the first bad line of ``seq.jsonl``; return if none."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            text = raw.strip()
            if not text:
                raise DataFormatError(path, _RECORD, "an empty line", line=number)
            try:
                line = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                truncated = " (the line looks truncated)" if not raw.endswith(b"\n") else ""
                raise DataFormatError(
                    path, _RECORD, f"invalid JSON{truncated}: {exc}", line=number
                ) from None
            if not isinstance(line, list):
                raise DataFormatError(path, _RECORD, f"a JSON {type(line).__name__}", line=number)
            users = set()
            for index, record in enumerate(line):
                problem = _record_problem(record)
                if problem:
                    raise DataFormatError(path, _RECORD, f"record {index}: {problem}", line=number)
                users.add(record[0])
            if len(users) > 1:
                raise DataFormatError(
                    path, "all records of a line to belong to one user", f"users {sorted(users)}", line=number
                )


def stage_predict_set(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """``predict_set.jsonl``: one object per candidate {creative_id, retrieval_id, features}."""
    feats = ", ".join(
        f"TRY_CAST(features->>'$.\"{f}\"' AS BIGINT) AS {feature_column(f)}" for f in ITEM_SPARSE_FEATURES
    )
    try:
        con.execute(
            f"""
            CREATE OR REPLACE TABLE stg_candidates AS
            SELECT creative_id, retrieval_id, {feats}, 0 AS cold_features
            FROM read_json({_sql_str(path)}, format='newline_delimited',
                           columns={{creative_id: 'BIGINT', retrieval_id: 'BIGINT', features: 'JSON'}})
            """
        )
    except duckdb.Error as exc:
        _diagnose_predict_set(path)
        raise DataFormatError(
            path, "JSON lines {creative_id, retrieval_id, features}", f"unreadable ({exc})"
        ) from exc
    nulls = con.execute(
        "SELECT count(*) FROM stg_candidates WHERE creative_id IS NULL OR retrieval_id IS NULL"
    ).fetchall()[0][0]
    if nulls:
        _diagnose_predict_set(path)
        raise DataFormatError(path, "non-null creative_id and retrieval_id", f"{nulls} rows with nulls")


def _diagnose_predict_set(path: Path) -> None:
    expected = "a JSON object {creative_id: int, retrieval_id: int, features: object}"
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataFormatError(path, expected, f"invalid JSON: {exc}", line=number) from None
            if not isinstance(row, dict) or not _is_int(row.get("creative_id")) or not _is_int(
                row.get("retrieval_id")
            ):
                raise DataFormatError(path, expected, json.dumps(row)[:120], line=number)


def stage_jsonl_dataset(con: duckdb.DuckDBPyConnection, root: Path) -> dict[str, int]:
    vocab = stage_indexer(con, root / "indexer.pkl")
    stage_seq_jsonl(con, root / "seq.jsonl")
    predict_set = root / "predict_set.jsonl"
    if predict_set.is_file():
        stage_predict_set(con, predict_set)
    else:
        log.info("%s has no predict_set.jsonl: the candidate pool is built from the items", root)
        create_empty_candidates(con)
    return vocab
