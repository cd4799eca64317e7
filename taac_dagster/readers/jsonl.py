"""Reader for the competition format: ``seq.jsonl`` + ``indexer.pkl`` (+ ``predict_set.jsonl``).

DuckDB parses each file once (fast path) and checks every field of every record in the same
query against the format's types and the track's domain (``RECORD_RULES``): the query marks
each record with the first rule it breaks. A file DuckDB cannot parse at all (invalid JSON,
bytes that are not UTF-8, a line too long) is read again in bounded pieces to find the line;
a record that breaks a rule is named from the rule, the line DuckDB numbered and the record
itself, so the rules live in one place (the SQL) and the error always says the file, the
line, the record, the field, what was expected and what was found.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import duckdb

from taac_dagster.errors import DataFormatError
from taac_dagster.formats import (
    ITEM_SPARSE_FEATURES,
    JSONL_RECORD_FIELDS,
    RAW_ID_TYPE,
    USER_ARRAY_FEATURES,
    USER_SPARSE_FEATURES,
    feature_column,
    raw_id_sql,
)
from taac_dagster.readers import json_lines
from taac_dagster.readers.json_lines import json_integer_sql
from taac_dagster.readers.staging import create_empty_candidates, stage_indexer, user_feature_select
from taac_dagster.sql import read_path, sql_read_path
from taac_dagster.tracks import CLICK, CONVERSION, EXPOSURE

log = logging.getLogger(__name__)

_RECORD = (
    "a JSON list of records [user_id, item_id, user_feature, item_feature, action_type, "
    "timestamp] with integer ids and timestamps"
)
ALL_ACTIONS = (EXPOSURE, CLICK, CONVERSION)

# A feature value is a re-id: a non-negative integer (at most 18 digits, so it fits BIGINT).
_FEATURE_VALUE = "[0-9]{1,18}"
_FEATURE_KEY = '"[0-9]+"'
_ITEM_FEATURES_RE = rf"\{{(?:{_FEATURE_KEY}:(?:{_FEATURE_VALUE}|null)(?:,{_FEATURE_KEY}:(?:{_FEATURE_VALUE}|null))*)?\}}"
_USER_VALUE = rf"(?:{_FEATURE_VALUE}|null|\[(?:{_FEATURE_VALUE}(?:,{_FEATURE_VALUE})*)?\])"
_USER_FEATURES_RE = rf"\{{(?:{_FEATURE_KEY}:{_USER_VALUE}(?:,{_FEATURE_KEY}:{_USER_VALUE})*)?\}}"
_SPARSE_AS_LIST_RE = '"(?:' + "|".join(USER_SPARSE_FEATURES) + r')":\['


@dataclass(frozen=True)
class RecordRule:
    """One rule every record of ``seq.jsonl`` must keep: ``broken`` is a DuckDB condition over
    the typed columns of the staging query, true when the record breaks it."""

    field: str | None  # the record field it is about (None: the whole line or record)
    broken: str
    expected: str


def record_rules(actions: tuple[int, ...]) -> tuple[RecordRule, ...]:
    """The rules in the order they are tried; a record is reported under the first it breaks.

    They read the columns of the staging query's ``typed`` step: ``rec`` (the record), ``uf``
    and ``itf`` (user_feature, item_feature as JSON), the integers ``user_id``, ``item_id``,
    ``action_type``, ``ts`` (NULL unless the field is a JSON integer in range) and the JSON
    texts ``t_item``, ``t_action``, ``t_ts`` and ``t_user``."""
    allowed = ", ".join(str(a) for a in actions)
    positive_id = "an integer re-id from 1 to 2^63-1"
    interaction, profile = "uf IS NULL", "uf IS NOT NULL"
    return (
        RecordRule(None, "rec IS NULL", _RECORD),
        RecordRule(None, "len(rec) <> 6", f"a record of 6 fields [{', '.join(JSONL_RECORD_FIELDS)}]"),
        RecordRule("user_id", "user_id IS NULL OR user_id < 1", positive_id),
        RecordRule("user_id", "t_user <> line_user", "the same user_id as the line's first record (one user per line)"),
        RecordRule("item_id", f"{interaction} AND (item_id IS NULL OR item_id < 1)", f"{positive_id} in an interaction record"),
        RecordRule(
            "action_type",
            f"{interaction} AND t_action IS NOT NULL AND (action_type IS NULL OR action_type NOT IN ({allowed}))",
            f"null or one of {allowed}",
        ),
        RecordRule("timestamp", f"{interaction} AND (ts IS NULL OR ts < 0)", "integer Unix seconds (>= 0)"),
        RecordRule(
            "user_feature",
            f"{profile} AND NOT regexp_full_match(uf::VARCHAR, '{_USER_FEATURES_RE}')",
            "null (an interaction record) or an object {feature id: integer re-id, or a list of them for "
            f"{', '.join(USER_ARRAY_FEATURES)}}} (a user-profile record)",
        ),
        RecordRule(
            "user_feature",
            f"{profile} AND regexp_matches(uf::VARCHAR, '{_SPARSE_AS_LIST_RE}')",
            f"a single integer re-id for the features {', '.join(USER_SPARSE_FEATURES)}",
        ),
        RecordRule("item_id", f"{profile} AND t_item IS NOT NULL", "null in a user-profile record"),
        RecordRule("item_feature", f"{profile} AND itf IS NOT NULL", "null in a user-profile record"),
        RecordRule("action_type", f"{profile} AND t_action IS NOT NULL", "null in a user-profile record"),
        RecordRule(
            "timestamp", f"{profile} AND t_ts IS NOT NULL AND (ts IS NULL OR ts < 0)", "null or integer Unix seconds (>= 0)"
        ),
    )


def _records_sql(path: Path, rules: tuple[RecordRule, ...]) -> str:
    """Each line a list of records (``JSON[][]``), each record a list of JSON values, so no
    field is parsed twice. Interaction records are moved before the user-profile record(s) of
    their line, which makes their index the event position. A line that is not a list of
    records becomes one NULL record, so that it is reported like any broken record."""
    problem = "\n".join(f"WHEN {rule.broken} THEN {code}" for code, rule in enumerate(rules))
    return f"""
    CREATE OR REPLACE TABLE stg_jsonl_records AS
    WITH lines AS (
        SELECT ordinality AS line, TRY_CAST(json AS JSON[][]) AS recs
        FROM read_ndjson_objects({sql_read_path(path)}, maximum_object_size={json_lines.MAX_LINE_BYTES}) WITH ORDINALITY
    ), split AS (
        SELECT line,
               CASE WHEN recs IS NULL OR len(recs) = 0 THEN [NULL::JSON[]]
                    ELSE list_concat(list_filter(recs, lambda r: r[3] IS NULL),
                                     list_filter(recs, lambda r: r[3] IS NOT NULL)) END AS recs,
               coalesce(len(list_filter(recs, lambda r: r[3] IS NULL)), 0) AS n_events,
               recs[1][1]::VARCHAR AS line_user
        FROM lines
    ), flat AS (
        SELECT line, unnest(recs) AS rec, generate_subscripts(recs, 1) AS idx, n_events, line_user FROM split
    ), fields AS (
        SELECT line, idx, n_events, line_user, rec,
               rec[1]::VARCHAR AS t_user, rec[2]::VARCHAR AS t_item, rec[3] AS uf, rec[4] AS itf,
               rec[5]::VARCHAR AS t_action, rec[6]::VARCHAR AS t_ts
        FROM flat
    ), typed AS (
        SELECT *,
               {json_integer_sql("t_user")} AS user_id,
               {json_integer_sql("t_item")} AS item_id,
               {json_integer_sql("t_action", "INTEGER")} AS action_type,
               {json_integer_sql("t_ts")} AS ts
        FROM fields
    )
    SELECT
        line, idx, user_id,
        CASE WHEN idx <= n_events THEN (idx - 1)::INTEGER END AS position,
        item_id, action_type, ts AS "timestamp",
        uf AS user_feature,
        itf AS item_feature,
        CASE {problem} END::UTINYINT AS problem
    FROM typed
    """


def _original_record_index(line: object, staged_index: int) -> int:
    """Where the ``staged_index``-th record (1-based, interaction records first) sits in the
    line as written (0-based)."""
    if not isinstance(line, list) or not line:
        return 0

    def is_interaction(record: object) -> bool:  # SQL's rec[3] IS NULL
        return not isinstance(record, list) or len(record) < 3 or record[2] is None

    order = [i for i, r in enumerate(line) if is_interaction(r)] + [i for i, r in enumerate(line) if not is_interaction(r)]
    return order[staged_index - 1] if 0 < staged_index <= len(order) else 0


def _describe(value: object) -> str:
    """A found value for a message: its JSON, its kind, and for an object of features the first
    entry that is not an integer re-id (a long object is cut)."""
    if isinstance(value, dict):
        entry = next(
            ((k, v) for k, v in value.items()
             if not (v is None or (type(v) is int and v >= 0)
                     or (isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)))),
            None,
        )
        if entry is not None:
            return f"{json.dumps(entry[0])}: {_describe(entry[1])} in {_describe_text(value)}"
    return _describe_text(value)


def _describe_text(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", float: "a number with a fraction"}.get(
        type(value)
    )
    if value is None:
        return "null"
    if kind and kind != "a boolean" and len(text) > 160:
        text = text[:160] + "..."
    return f"{text} ({kind})" if kind else text


def raise_record_problem(path: Path, rules: tuple[RecordRule, ...], ordinal: int, staged_index: int, code: int) -> None:
    """Raise the DataFormatError for the record DuckDB marked with rule ``code``."""
    rule = rules[code]
    number, raw = json_lines.physical_line(path, ordinal)
    line = json.loads(raw)
    if not isinstance(line, list) or not line:
        found = "an empty list" if line == [] else f"a JSON {'object' if isinstance(line, dict) else type(line).__name__}"
        raise DataFormatError(path, rule.expected, f"{found}: {raw.decode(errors='replace').strip()[:160]}", line=number)
    index = _original_record_index(line, staged_index)
    record = line[index]
    if rule.field is None:
        if isinstance(record, list):
            found = f"{len(record)} fields instead of 6: {_describe(record)}"
        else:
            found = f"a record that is {_describe(record)}, not a list"
        raise DataFormatError(path, rule.expected, found, line=number, record=index)
    value = record[JSONL_RECORD_FIELDS.index(rule.field)]
    raise DataFormatError(path, rule.expected, _describe(value), line=number, record=index, field=rule.field)


def _read_failed(path: Path, exc: duckdb.Error, expected: str) -> DataFormatError:
    """The error for a file DuckDB could not read: the first bad line when one is found."""
    json_lines.diagnose_lines(path, expected)
    return DataFormatError(path, expected, f"a file DuckDB cannot read ({json_lines.short(exc)})")


def _first_broken(
    con: duckdb.DuckDBPyConnection, table: str, columns: str, path: Path, expected: str, what: str
) -> tuple | None:
    """``columns`` of the first row of a staged JSON-lines ``table`` that broke a rule (None when
    none did); a file with no line at all is an error."""
    lines, bad = con.execute(
        f"SELECT count(DISTINCT line), count(*) FILTER (WHERE problem IS NOT NULL) FROM {table}"
    ).fetchall()[0]
    if not lines:
        raise DataFormatError(path, expected, f"no {what} (only blank lines)")
    if not bad:
        return None
    return con.execute(f"SELECT {columns} FROM {table} WHERE problem IS NOT NULL ORDER BY {columns} LIMIT 1").fetchall()[0]


def stage_seq_jsonl(con: duckdb.DuckDBPyConnection, path: Path, *, actions: tuple[int, ...] = ALL_ACTIONS) -> None:
    """Parse ``seq.jsonl`` into ``stg_events``, ``stg_user_features`` and ``stg_item_features``,
    every record checked against ``RECORD_RULES`` with ``actions`` as the allowed action types."""
    json_lines.require_content(path, _RECORD)
    rules = record_rules(actions)
    try:
        con.execute(_records_sql(path, rules))
    except duckdb.Error as exc:
        raise _read_failed(path, exc, _RECORD) from None
    first = _first_broken(con, "stg_jsonl_records", "line, idx, problem", path, _RECORD, "records")
    if first:
        raise_record_problem(path, rules, int(first[0]), int(first[1]), int(first[2]))

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
    _stage_item_feature_texts(con, path)
    item_cols = ", ".join(
        f"TRY_CAST(item_feature->>'$.\"{f}\"' AS BIGINT) AS {feature_column(f)}" for f in ITEM_SPARSE_FEATURES
    )
    con.execute(
        f"CREATE OR REPLACE TABLE stg_item_features AS SELECT item_id, {item_cols} FROM stg_jsonl_item_json"
    )
    con.execute("DROP TABLE stg_jsonl_item_json")


_ITEM_FEATURE_EXPECTED = "null or an object {feature id: integer re-id or null}"


def _stage_item_feature_texts(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """``stg_jsonl_item_json``: one item_feature object per item, after checking every distinct
    (item, item_feature) text of the file. An item's records usually repeat one object, so the
    pattern runs over the distinct texts (one per item, a few more in real data), not over
    every record, and the first line holding a bad one is known from the same grouping."""
    con.execute(
        """
        CREATE OR REPLACE TABLE stg_jsonl_item_texts AS
        SELECT item_id, item_feature, min(line) AS first_line FROM stg_jsonl_records
        WHERE position IS NOT NULL AND item_feature IS NOT NULL GROUP BY item_id, item_feature
        """
    )
    bad = con.execute(
        f"""SELECT first_line, item_id, item_feature::VARCHAR FROM stg_jsonl_item_texts
            WHERE NOT regexp_full_match(item_feature::VARCHAR, '{_ITEM_FEATURES_RE}')
            ORDER BY first_line LIMIT 1"""
    ).fetchall()
    if bad:
        ordinal, item_id, text = bad[0]
        number, raw = json_lines.physical_line(path, int(ordinal))
        records = json.loads(raw)
        wanted = json.loads(text)
        index = next(
            (i for i, r in enumerate(records) if isinstance(r, list) and len(r) == 6 and r[1] == item_id and r[3] == wanted),
            next((i for i, r in enumerate(records) if isinstance(r, list) and len(r) == 6 and r[1] == item_id), None),
        )
        value = records[index][3] if index is not None else wanted
        raise DataFormatError(
            path, _ITEM_FEATURE_EXPECTED, _describe(value), line=number, record=index, field="item_feature"
        )
    con.execute(
        """CREATE OR REPLACE TABLE stg_jsonl_item_json AS
           SELECT item_id, any_value(item_feature) AS item_feature FROM stg_jsonl_item_texts GROUP BY item_id"""
    )
    con.execute("DROP TABLE stg_jsonl_item_texts")


def locate_users_jsonl(con: duckdb.DuckDBPyConnection, path: Path, user_ids: list[int]) -> dict[int, list[str]]:
    """Where each of ``user_ids`` comes from: ``<file> line <n>`` for every line whose first
    record is theirs."""
    rows = con.execute(
        f"""SELECT ordinality, user_id FROM (
                SELECT ordinality, {json_integer_sql("json->>'$[0][0]'")} AS user_id
                FROM read_ndjson_objects(?, maximum_object_size={json_lines.MAX_LINE_BYTES}) WITH ORDINALITY)
            WHERE list_contains(?, user_id) ORDER BY ordinality""",
        [read_path(path), list(user_ids)],
    ).fetchall()
    numbers = json_lines.physical_lines(path, {int(ordinal) for ordinal, _ in rows})
    found: dict[int, list[str]] = {}
    for ordinal, user in rows:
        found.setdefault(int(user), []).append(f"{path} line {numbers.get(int(ordinal), ordinal)}")
    return found


# --- predict_set.jsonl ---------------------------------------------------------------------
_CANDIDATE = (
    f"a JSON object {{creative_id: {RAW_ID_TYPE}, retrieval_id: integer, features: object of integer re-ids}}"
)


def _candidate_rules() -> tuple[RecordRule, ...]:
    return (
        RecordRule(None, "json_type(obj) IS DISTINCT FROM 'OBJECT'", _CANDIDATE),
        RecordRule("creative_id", "creative_id IS NULL", f"a raw creative id ({RAW_ID_TYPE}) below 2^63"),
        RecordRule("retrieval_id", "retrieval_id IS NULL", "an integer retrieval id"),
        RecordRule(
            "features",
            "coalesce(json_type(obj, '$.features'), 'NULL') <> 'NULL' "
            f"AND NOT regexp_full_match((obj->'$.features')::VARCHAR, '{_ITEM_FEATURES_RE}')",
            _ITEM_FEATURE_EXPECTED,
        ),
    )


def stage_predict_set(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """``predict_set.jsonl``: one object per candidate {creative_id, retrieval_id, features}."""
    json_lines.require_content(path, _CANDIDATE)
    rules = _candidate_rules()
    problem = "\n".join(f"WHEN {rule.broken} THEN {code}" for code, rule in enumerate(rules))
    feats = ", ".join(
        f"TRY_CAST(obj->>'$.features.\"{f}\"' AS BIGINT) AS {feature_column(f)}" for f in ITEM_SPARSE_FEATURES
    )
    try:
        con.execute(
            f"""
            CREATE OR REPLACE TABLE stg_predict_set AS
            WITH typed AS (
                SELECT ordinality AS line, json AS obj,
                       CASE WHEN json_type(json, '$.creative_id') IN ('BIGINT', 'UBIGINT', 'VARCHAR')
                            THEN {raw_id_sql("json->>'$.creative_id'")} END AS creative_id,
                       {json_integer_sql("(json->'$.retrieval_id')::VARCHAR")} AS retrieval_id
                FROM read_ndjson_objects({sql_read_path(path)}, maximum_object_size={json_lines.MAX_LINE_BYTES})
                     WITH ORDINALITY
            )
            SELECT line, creative_id, retrieval_id, {feats}, CASE {problem} END::UTINYINT AS problem FROM typed
            """
        )
    except duckdb.Error as exc:
        raise _read_failed(path, exc, _CANDIDATE) from None
    first = _first_broken(con, "stg_predict_set", "line, problem", path, _CANDIDATE, "candidates")
    if first:
        ordinal, code = first
        rule = rules[int(code)]
        number, raw = json_lines.physical_line(path, int(ordinal))
        row = json.loads(raw)
        value = row.get(rule.field) if isinstance(row, dict) and rule.field else row
        raise DataFormatError(path, rule.expected, _describe(value), line=number, field=rule.field)
    con.execute(
        f"""CREATE OR REPLACE TABLE stg_candidates AS
            SELECT creative_id, retrieval_id, {", ".join(feature_column(f) for f in ITEM_SPARSE_FEATURES)},
                   0 AS cold_features
            FROM stg_predict_set"""
    )
    con.execute("DROP TABLE stg_predict_set")


def stage_jsonl_dataset(
    con: duckdb.DuckDBPyConnection, root: Path, *, actions: tuple[int, ...] = ALL_ACTIONS
) -> dict[str, int]:
    vocab = stage_indexer(con, root / "indexer.pkl")
    stage_seq_jsonl(con, root / "seq.jsonl", actions=actions)
    predict_set = root / "predict_set.jsonl"
    if predict_set.is_file():
        stage_predict_set(con, predict_set)
    else:
        log.info("%s has no predict_set.jsonl: the candidate pool is built from the items", root)
        create_empty_candidates(con)
    return vocab
