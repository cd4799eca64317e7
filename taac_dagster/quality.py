"""Data-quality checks of the warehouse: Great Expectations suites plus full-table SQL counts.

Great Expectations 1.x cannot validate DuckDB through its SQL datasource, so each suite runs
on a pandas frame read through a read-only DuckDB connection: every row of the sampled users
(``user_id % modulus = 0``, deterministic; re-ids are dense so this is a uniform sample) or
of the whole table when it is small. The cheap invariants are also counted over the whole
table in SQL, so a violation outside the sample still fails the check.

Nothing here imports Dagster; ``assets/quality.py`` turns ``CheckOutcome`` into check results.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from taac_dagster.formats import ITEM_SPARSE_FEATURES, USER_ARRAY_FEATURES, USER_SPARSE_FEATURES, feature_column
from taac_dagster.tracks import get_track

ERROR, WARN = "ERROR", "WARN"


@dataclass
class CheckOutcome:
    name: str
    table: str
    passed: bool
    severity: str
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


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

    def frame(self, sql: str) -> pd.DataFrame:
        return self.con.execute(sql).df()

    def count(self, sql: str) -> int:
        return int(self.con.execute(sql).fetchall()[0][0])


# --- Great Expectations -------------------------------------------------------------------


def _gx():
    import great_expectations as gx  # imported lazily: the import takes seconds

    return gx


def validate_frame(suite_name: str, frame: pd.DataFrame, expectations: list[Any]) -> dict[str, Any]:
    """Run a GE suite on ``frame`` in an ephemeral context; return a JSON-friendly summary."""
    gx = _gx()
    context = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # progress bars are cosmetic; an API change must not fail a check
        pass
    source = context.data_sources.add_pandas(f"{suite_name}_source")
    asset = source.add_dataframe_asset(name=suite_name)
    batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(
        batch_parameters={"dataframe": frame}
    )
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=expectations))
    result = batch.validate(suite)
    failures = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        detail = {
            "expectation": config.type,
            "kwargs": {k: v for k, v in config.kwargs.items() if k != "batch_id"},
        }
        for key in ("unexpected_count", "unexpected_percent", "observed_value", "partial_unexpected_list"):
            if key in item.result:
                value = item.result[key]
                detail[key] = value[:5] if isinstance(value, list) else value
        failures.append(detail)
    return {
        "success": bool(result.success),
        "rows_validated": len(frame),
        "expectations": len(result.results),
        "failed_expectations": len(failures),
        "failures": _jsonable(failures),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _outcome(spec_name: str, table: str, description: str, severity: str, suite: dict[str, Any], sql_counts: dict[str, int]) -> CheckOutcome:
    passed = suite["success"] and all(count == 0 for count in sql_counts.values())
    return CheckOutcome(
        spec_name,
        table,
        passed,
        severity,
        description,
        {"ge": suite, "full_table_violations": sql_counts},
    )


# --- the checks -----------------------------------------------------------------------------


def _vocab(ctx: CheckContext) -> dict[str, int]:
    return {fid: int(size) for fid, size in ctx.con.execute("SELECT feature_id, vocab_size FROM feature_vocab").fetchall()}


def check_events_schema(ctx: CheckContext) -> CheckOutcome:
    gx = _gx()
    E = gx.expectations
    allowed = list(get_track(ctx.track).allowed_actions)
    frame = ctx.frame(
        f"""SELECT e.*, lag("timestamp") OVER (PARTITION BY user_id ORDER BY position) AS prev_timestamp,
                   i.item_id IS NOT NULL AS item_known
            FROM events e LEFT JOIN items i USING (item_id)
            WHERE e.user_id % {ctx.modulus} = 0"""
    )
    expectations = [
        E.ExpectTableColumnsToMatchSet(
            column_set=["user_id", "position", "item_id", "action_type", "action_type_missing", "timestamp", "prev_timestamp", "item_known"],
            exact_match=True,
        ),
        *[E.ExpectColumnValuesToBeOfType(column=c, type_="int64") for c in ("user_id", "item_id", "timestamp")],
        *[E.ExpectColumnValuesToNotBeNull(column=c) for c in ("user_id", "item_id", "position", "action_type", "timestamp")],
        E.ExpectColumnValuesToBeInSet(column="action_type", value_set=allowed),
        E.ExpectColumnValuesToBeBetween(column="position", min_value=0),
        E.ExpectColumnValuesToBeBetween(column="item_id", min_value=1),
        E.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="timestamp", column_B="prev_timestamp", or_equal=True, ignore_row_if="either_value_is_missing"
        ),
        E.ExpectColumnValuesToBeInSet(column="item_known", value_set=[True]),
    ]
    suite = validate_frame("events", frame, expectations)
    in_set = ", ".join(str(a) for a in allowed)
    counts = {
        "null_ids": ctx.count("SELECT count(*) FROM events WHERE user_id IS NULL OR item_id IS NULL OR \"timestamp\" IS NULL"),
        "action_type_not_allowed": ctx.count(f"SELECT count(*) FROM events WHERE action_type NOT IN ({in_set})"),
        "timestamp_decreases": ctx.count(
            """SELECT count(*) FROM (SELECT "timestamp" < lag("timestamp") OVER (PARTITION BY user_id ORDER BY position) AS dec
               FROM events) WHERE dec"""
        ),
        "item_not_in_items": ctx.count("SELECT count(*) FROM events e ANTI JOIN items i USING (item_id)"),
    }
    return _outcome(
        "events_valid", "events",
        "schema and types, non-null ids, action types allowed on this track, timestamps non-decreasing within a user, every item in items",
        ERROR, suite, counts,
    )


def check_events_missing_actions(ctx: CheckContext) -> CheckOutcome:
    missing = ctx.count("SELECT count(*) FROM events WHERE action_type_missing")
    total = ctx.count("SELECT count(*) FROM events")
    return CheckOutcome(
        "events_missing_action_types", "events", missing == 0, WARN,
        "records whose action_type was null in the source: kept in the history as exposures, never targets",
        {"missing_action_types": missing, "events": total, "share": round(missing / total, 5) if total else 0.0},
    )


def check_items(ctx: CheckContext) -> CheckOutcome:
    E = _gx().expectations
    vocab = _vocab(ctx)
    frame = ctx.frame("SELECT * FROM items")
    expectations = [
        E.ExpectColumnValuesToNotBeNull(column="item_id"),
        E.ExpectColumnValuesToBeUnique(column="item_id"),
        E.ExpectColumnValuesToBeBetween(column="item_id", min_value=1),
    ]
    for fid in ITEM_SPARSE_FEATURES:
        column = feature_column(fid)
        if column in frame.columns and fid in vocab:
            expectations.append(E.ExpectColumnValuesToBeBetween(column=column, min_value=1, max_value=vocab[fid]))
    suite = validate_frame("items", frame, expectations)
    counts = {"duplicate_item_ids": ctx.count("SELECT count(*) - count(DISTINCT item_id) FROM items")}
    return _outcome("items_valid", "items", "unique non-null item ids; feature values within their vocabulary", ERROR, suite, counts)


def check_users(ctx: CheckContext) -> CheckOutcome:
    E = _gx().expectations
    vocab = _vocab(ctx)
    arrays = [feature_column(f) for f in USER_ARRAY_FEATURES]
    bounds = ", ".join(f"list_min({c}) AS {c}_min, list_max({c}) AS {c}_max" for c in arrays)
    frame = ctx.frame(f"SELECT * EXCLUDE ({', '.join(arrays)}), {bounds} FROM users WHERE user_id % {ctx.modulus} = 0")
    expectations = [
        E.ExpectColumnValuesToNotBeNull(column="user_id"),
        E.ExpectColumnValuesToBeUnique(column="user_id"),
    ]
    for fid in USER_SPARSE_FEATURES:
        if fid in vocab:
            expectations.append(E.ExpectColumnValuesToBeBetween(column=feature_column(fid), min_value=1, max_value=vocab[fid]))
    for fid in USER_ARRAY_FEATURES:
        if fid in vocab:
            c = feature_column(fid)
            expectations.append(E.ExpectColumnValuesToBeBetween(column=f"{c}_min", min_value=1))
            expectations.append(E.ExpectColumnValuesToBeBetween(column=f"{c}_max", max_value=vocab[fid]))
    suite = validate_frame("users", frame, expectations)
    counts = {"duplicate_user_ids": ctx.count("SELECT count(*) - count(DISTINCT user_id) FROM users")}
    return _outcome("users_valid", "users", "unique non-null user ids; feature values within their vocabulary", ERROR, suite, counts)


def check_sequences(ctx: CheckContext) -> CheckOutcome:
    E = _gx().expectations
    frame = ctx.frame(
        f"""SELECT s.user_id, s.length, len(s.item_ids) AS n_items, len(s.action_types) AS n_actions,
                   len(s.timestamps) AS n_timestamps, s.last_position, h.target_position
            FROM sequences s LEFT JOIN holdout h USING (user_id)
            WHERE s.user_id % {ctx.modulus} = 0"""
    )
    expectations = [
        E.ExpectColumnValuesToNotBeNull(column="user_id"),
        E.ExpectColumnValuesToBeUnique(column="user_id"),
        E.ExpectColumnValuesToBeBetween(column="length", min_value=1, max_value=ctx.max_history),
        E.ExpectColumnPairValuesToBeEqual(column_A="length", column_B="n_items"),
        E.ExpectColumnPairValuesToBeEqual(column_A="n_items", column_B="n_actions"),
        E.ExpectColumnPairValuesToBeEqual(column_A="n_items", column_B="n_timestamps"),
        # No target or later event reaches training.
        E.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="target_position", column_B="last_position", ignore_row_if="either_value_is_missing"
        ),
    ]
    suite = validate_frame("sequences", frame, expectations)
    counts = {
        "too_long": ctx.count(f"SELECT count(*) FROM sequences WHERE length > {ctx.max_history} OR length < 1"),
        "misaligned_lists": ctx.count(
            "SELECT count(*) FROM sequences WHERE len(item_ids) <> len(action_types) OR len(item_ids) <> len(timestamps) OR len(item_ids) <> length"
        ),
        "target_leaks": ctx.count(
            "SELECT count(*) FROM sequences s JOIN holdout h USING (user_id) WHERE s.last_position >= h.target_position"
        ),
    }
    return _outcome(
        "sequences_valid", "sequences",
        f"history length 1..{ctx.max_history}, aligned lists, no target or later event in training",
        ERROR, suite, counts,
    )


def check_holdout(ctx: CheckContext) -> CheckOutcome:
    E = _gx().expectations
    targets = list(get_track(ctx.track).target_priority)
    frame = ctx.frame(
        f"""SELECT h.user_id, h.target_item_id, h.target_action_type, h.target_position,
                   len(h.history_item_ids) AS history_length,
                   coalesce(list_max(h.history_timestamps) <= h.target_timestamp, true) AS history_before_target,
                   c.creative_id IS NOT NULL AS target_in_candidates
            FROM holdout h LEFT JOIN (SELECT DISTINCT item_id, creative_id FROM candidates) c ON c.item_id = h.target_item_id
            WHERE h.user_id % {ctx.modulus} = 0"""
    )
    expectations = [
        *[E.ExpectColumnValuesToNotBeNull(column=c) for c in ("user_id", "target_item_id", "target_action_type")],
        E.ExpectColumnValuesToBeUnique(column="user_id"),
        E.ExpectColumnValuesToBeInSet(column="target_action_type", value_set=targets),
        E.ExpectColumnValuesToBeBetween(column="history_length", min_value=0, max_value=ctx.max_history),
        E.ExpectColumnValuesToBeInSet(column="history_before_target", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="target_in_candidates", value_set=[True]),
    ]
    suite = validate_frame("holdout", frame, expectations)
    counts = {
        "target_not_in_candidates": ctx.count(
            "SELECT count(*) FROM holdout h ANTI JOIN candidates c ON c.item_id = h.target_item_id"
        ),
        "history_not_before_target": ctx.count(
            "SELECT count(*) FROM holdout WHERE list_max(history_timestamps) > target_timestamp"
        ),
    }
    return _outcome(
        "holdout_valid", "holdout",
        "one target per user of the track's target types, history strictly before it, every target in candidates",
        ERROR, suite, counts,
    )


def check_candidates(ctx: CheckContext) -> CheckOutcome:
    E = _gx().expectations
    frame = ctx.frame("SELECT creative_id, item_id, retrieval_id, is_cold FROM candidates")
    expectations = [
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToNotBeNull(column="creative_id"),
        E.ExpectColumnValuesToBeUnique(column="creative_id"),
        E.ExpectColumnValuesToNotBeNull(column="retrieval_id"),
        E.ExpectColumnValuesToBeUnique(column="retrieval_id"),
        E.ExpectColumnValuesToNotBeNull(column="is_cold"),
    ]
    suite = validate_frame("candidates", frame, expectations)
    return _outcome("candidates_valid", "candidates", "a non-empty pool of unique creative and retrieval ids", ERROR, suite, {})


def check_embeddings(ctx: CheckContext) -> CheckOutcome:
    E = _gx().expectations
    suites, counts = {}, {}
    for family, dim, path in ctx.embedding_files:
        frame = ctx.frame(
            f"""SELECT creative_id, item_id, len(emb) AS dim,
                       list_bool_or(list_transform(emb, lambda x: isnan(x) OR isinf(x))) AS non_finite
                FROM read_parquet('{path}') WHERE hash(creative_id) % {ctx.modulus} = 0"""
        )
        suites[str(family)] = validate_frame(
            f"embeddings_{family}",
            frame,
            [
                E.ExpectColumnValuesToNotBeNull(column="creative_id"),
                E.ExpectColumnValuesToBeUnique(column="creative_id"),
                E.ExpectColumnValuesToBeInSet(column="dim", value_set=[dim]),
                E.ExpectColumnValuesToBeInSet(column="non_finite", value_set=[False]),
            ],
        )
        counts[f"family_{family}_wrong_dim"] = ctx.count(f"SELECT count(*) FROM read_parquet('{path}') WHERE len(emb) <> {dim}")
    success = all(s["success"] for s in suites.values())
    passed = success and all(c == 0 for c in counts.values())
    return CheckOutcome(
        "embeddings_valid", "item_embeddings", passed, ERROR,
        "every chosen family present, each vector of the family's dimension and finite",
        {"ge": suites, "full_table_violations": counts},
    )


CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("events_valid", "events", "events: schema, ids, action types, time order, known items", ERROR, check_events_schema),
    CheckSpec("events_missing_action_types", "events", "events whose action type was null (kept as exposures)", WARN, check_events_missing_actions),
    CheckSpec("items_valid", "items", "items: unique ids, feature values in vocabulary", ERROR, check_items),
    CheckSpec("users_valid", "users", "users: unique ids, feature values in vocabulary", ERROR, check_users),
    CheckSpec("sequences_valid", "sequences", "sequences: length <= max history, aligned, no target leak", ERROR, check_sequences),
    CheckSpec("holdout_valid", "holdout", "holdout: one target per user, in candidates, history before it", ERROR, check_holdout),
    CheckSpec("candidates_valid", "candidates", "candidates: non-empty, unique ids", ERROR, check_candidates),
    CheckSpec("embeddings_valid", "item_embeddings", "embeddings: family dimension, finite values", ERROR, check_embeddings),
)


def run_checks(
    warehouse: Path, track: str, *, max_history: int, sample_users: int, names: list[str] | None = None
) -> list[CheckOutcome]:
    """Run the named checks (default: all) on a warehouse through a read-only connection."""
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        n_users = int(con.execute("SELECT count(*) FROM users").fetchall()[0][0])
        modulus = max(1, math.ceil(n_users / sample_users))
        files = [
            (int(f), int(d), str(p))
            for f, d, p in con.execute("SELECT family, dim, path FROM embedding_families ORDER BY family").fetchall()
        ]
        ctx = CheckContext(con, track, max_history, modulus, files)
        outcomes = []
        for spec in CHECKS:
            if names is None or spec.name in names:
                outcome = spec.run(ctx)
                outcome.metadata["sample_modulus"] = modulus
                outcomes.append(outcome)
        return outcomes
    finally:
        con.close()
