"""Data-quality checks of the warehouse: Great Expectations suites plus full-table SQL counts.

Great Expectations 1.x cannot validate DuckDB through its SQL datasource, so each suite runs
on a pandas frame read through a read-only DuckDB connection: every row of the sampled users
(``user_id % modulus = 0``, deterministic; re-ids are dense so this is a uniform sample) or
of the whole table when it is small. The invariants a SQL count settles cheaply are counted
over the whole table (never a sample): non-empty tables, unique users and (user, position)
pairs, plausible timestamps, finite vectors... A failed check's description names the
offending ids and, read back from the raw dataset, the file and line or row they came from.

Nothing here imports Dagster; ``assets/quality.py`` turns ``CheckOutcome`` into check results.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pandas as pd

from taac_dagster.formats import ITEM_SPARSE_FEATURES, USER_ARRAY_FEATURES, USER_SPARSE_FEATURES, feature_column
from taac_dagster.sql import read_path
from taac_dagster.tracks import get_track

if TYPE_CHECKING:
    from taac_dagster.settings import TaacSettings

ERROR, WARN = "ERROR", "WARN"


# Timestamps are Unix seconds: before 2100-01-01 (milliseconds of 2025 are ~1.7e12), and the
# whole dataset within 2^31 - 1 seconds (68 years): training stores them as int32 offsets.
MAX_PLAUSIBLE_TIMESTAMP = 4_102_444_800
MAX_TIMESTAMP_SPAN = 2**31 - 1
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
        from taac_dagster.readers.locate import user_sources

        places = user_sources(self.con, self.source_root, self.dataset_format, user_ids)
        return ", ".join(f"user {u}" + (f" ({places[u]})" if u in places else "") for u in user_ids)

    @property
    def source_text(self) -> str:
        return str(self.source_root) if self.source_root else "the raw dataset"


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


def _outcome(
    spec_name: str,
    table: str,
    description: str,
    severity: str,
    suite: dict[str, Any],
    sql_counts: dict[str, int],
    problems: list[str] | None = None,
) -> CheckOutcome:
    problems = list(problems or [])
    counted = [name for name, count in sql_counts.items() if count]
    if counted and not problems:
        problems.append("full-table violations: " + ", ".join(f"{name} {sql_counts[name]}" for name in counted))
    if not suite["success"] and not problems:
        problems.append(
            "expectations failed on the sample: "
            + ", ".join(f"{f['expectation']} ({f['kwargs'].get('column', '')})" for f in suite["failures"])
        )
    passed = suite["success"] and all(count == 0 for count in sql_counts.values())
    return CheckOutcome(
        spec_name,
        table,
        passed,
        severity,
        description,
        {"ge": suite, "full_table_violations": sql_counts},
        problems if not passed else [],
    )


def _named(ids: list[Any], total: int) -> str:
    more = f" and {total - len(ids)} more" if total > len(ids) else ""
    return ", ".join(str(i) for i in ids) + more


def _empty(ctx: CheckContext, table: str, why: str) -> str | None:
    """A problem when ``table`` has no rows (the chain needs it), else None."""
    if ctx.count(f"SELECT count(*) FROM {table}"):
        return None
    return f"table {table} is empty: {why} (source {ctx.source_text})"


# --- the checks -----------------------------------------------------------------------------


def _empty_suite() -> dict[str, Any]:
    """The summary of a suite that had no row to validate (the full-table counts still run)."""
    return {"success": True, "rows_validated": 0, "expectations": 0, "failed_expectations": 0, "failures": []}


def _vocab(ctx: CheckContext) -> dict[str, int]:
    return {fid: int(size) for fid, size in ctx.con.execute("SELECT feature_id, vocab_size FROM feature_vocab").fetchall()}


def _duplicate_positions(ctx: CheckContext) -> tuple[int, str | None]:
    """Users whose positions are not exactly 0..n-1: a (user, position) pair twice, i.e. a user
    on more than one line or row of the source. One aggregate over the whole table."""
    offenders = ctx.rows(
        """SELECT user_id FROM events GROUP BY user_id
           HAVING count(*) <> max(position) + 1 OR min(position) <> 0 ORDER BY user_id"""
    )
    if not offenders:
        return 0, None
    ids = [int(r[0]) for r in offenders[:NAMED]]
    return len(offenders), (
        f"{len(offenders)} user(s) have two events at the same position, i.e. appear on more than one line or row "
        f"of the source: {ctx.users_where(ids)}" + (f" and {len(offenders) - NAMED} more" if len(offenders) > NAMED else "")
    )


def _implausible_timestamps(ctx: CheckContext) -> tuple[int, str | None]:
    """Timestamps that cannot be Unix seconds (negative, after 2099, or a dataset spanning more
    than 68 years): milliseconds, most often."""
    bad = ctx.count(
        'SELECT count(*) FROM events WHERE "timestamp" < 0 OR "timestamp" >= ?', [MAX_PLAUSIBLE_TIMESTAMP]
    )
    low, high = ctx.rows('SELECT min("timestamp"), max("timestamp") FROM events')[0]
    span_too_long = low is not None and high - low > MAX_TIMESTAMP_SPAN
    if not bad and not span_too_long:
        return 0, None
    examples = ctx.rows(
        """SELECT user_id, position, "timestamp" FROM events WHERE "timestamp" < 0 OR "timestamp" >= ?
           ORDER BY user_id, position LIMIT 3""",
        [MAX_PLAUSIBLE_TIMESTAMP],
    ) or ctx.rows(
        'SELECT user_id, position, "timestamp" FROM events ORDER BY "timestamp" DESC LIMIT 1'
    )
    where = ctx.users_where(sorted({int(u) for u, _, _ in examples}))
    shown = ", ".join(f"{ts} (user {u}, event {p})" for u, p, ts in examples)
    return max(bad, 1), (
        f"timestamps are not plausible as Unix seconds: {bad} outside 0 .. {MAX_PLAUSIBLE_TIMESTAMP} (2100-01-01), "
        f"range {low} .. {high}{' (more than 68 years)' if span_too_long else ''}; e.g. {shown}. "
        f"Milliseconds? Timestamps must be seconds. From {where}"
    )


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
            column_set=["user_id", "position", "item_id", "action_type", "action_type_missing", "timestamp", "prev_timestamp",
                        "item_known"],
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
    suite = validate_frame("events", frame, expectations) if len(frame) else _empty_suite()
    in_set = ", ".join(str(a) for a in allowed)
    problems = []
    empty = _empty(ctx, "events", "the dataset holds no interaction records")
    if empty:
        problems.append(empty)
    duplicates, duplicate_problem = _duplicate_positions(ctx)
    implausible, timestamp_problem = _implausible_timestamps(ctx)
    counts = {
        "empty_table": int(empty is not None),
        "null_ids": ctx.count("SELECT count(*) FROM events WHERE user_id IS NULL OR item_id IS NULL OR \"timestamp\" IS NULL"),
        "action_type_not_allowed": ctx.count(f"SELECT count(*) FROM events WHERE action_type NOT IN ({in_set})"),
        "timestamp_decreases": ctx.count(
            """SELECT count(*) FROM (SELECT "timestamp" < lag("timestamp") OVER (PARTITION BY user_id ORDER BY position) AS dec
               FROM events) WHERE dec"""
        ),
        "item_not_in_items": ctx.count("SELECT count(*) FROM events e ANTI JOIN items i USING (item_id)"),
        "users_with_duplicate_positions": duplicates,
        "implausible_timestamps": implausible,
    }
    problems += [p for p in (duplicate_problem, timestamp_problem) if p]
    if counts["action_type_not_allowed"]:
        users = [int(r[0]) for r in ctx.rows(
            f"SELECT DISTINCT user_id FROM events WHERE action_type NOT IN ({in_set}) ORDER BY user_id LIMIT {NAMED}"
        )]
        problems.append(
            f"{counts['action_type_not_allowed']} events have an action type outside {in_set} (track {ctx.track}): "
            f"{ctx.users_where(users)}"
        )
    return _outcome(
        "events_valid", "events",
        "non-empty; schema and types, non-null ids, action types allowed on this track, one event per (user, "
        "position), timestamps plausible as seconds and non-decreasing within a user, every item in items",
        ERROR, suite, counts, problems,
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
    suite = validate_frame("items", frame, expectations) if len(frame) else _empty_suite()
    return _keyed_table_outcome(ctx, "items_valid", "items", "item_id", suite, "no item has features or appears in an event")


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
    suite = validate_frame("users", frame, expectations) if len(frame) else _empty_suite()
    return _keyed_table_outcome(ctx, "users_valid", "users", "user_id", suite, "no user has a profile or an event")


def _keyed_table_outcome(
    ctx: CheckContext, name: str, table: str, key: str, suite: dict[str, Any], why_empty: str
) -> CheckOutcome:
    """The outcome of a table keyed by ``key`` (items, users): its suite plus full-table counts
    of emptiness and duplicate keys."""
    empty = _empty(ctx, table, why_empty)
    counts = {
        "empty_table": int(empty is not None),
        f"duplicate_{key}s": ctx.count(f"SELECT count(*) - count(DISTINCT {key}) FROM {table}"),
    }
    return _outcome(
        name, table, f"non-empty; unique non-null {key}s; feature values within their vocabulary",
        ERROR, suite, counts, [empty] if empty else None,
    )


def _duplicate_users(ctx: CheckContext, table: str) -> tuple[int, str | None]:
    """Users with more than one row in ``table`` (full table), named with their source lines."""
    rows = ctx.rows(f"SELECT user_id FROM {table} GROUP BY user_id HAVING count(*) > 1 ORDER BY user_id")
    if not rows:
        return 0, None
    ids = [int(r[0]) for r in rows[:NAMED]]
    extra = f" and {len(rows) - NAMED} more" if len(rows) > NAMED else ""
    return len(rows), f"{len(rows)} user(s) have more than one row in {table}: {ctx.users_where(ids)}{extra}"


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
    suite = validate_frame("sequences", frame, expectations) if len(frame) else _empty_suite()
    empty = _empty(ctx, "sequences", "no user has an event before its target to train on")
    duplicates, duplicate_problem = _duplicate_users(ctx, "sequences")
    counts = {
        "empty_table": int(empty is not None),
        "duplicate_user_ids": duplicates,
        "too_long": ctx.count(f"SELECT count(*) FROM sequences WHERE length > {int(ctx.max_history)} OR length < 1"),
        "misaligned_lists": ctx.count(
            "SELECT count(*) FROM sequences WHERE len(item_ids) <> len(action_types) OR len(item_ids) <> len(timestamps) "
            "OR len(item_ids) <> length"
        ),
        "target_leaks": ctx.count(
            "SELECT count(*) FROM sequences s JOIN holdout h USING (user_id) WHERE s.last_position >= h.target_position"
        ),
    }
    problems = [p for p in (empty, duplicate_problem) if p]
    if counts["too_long"] or counts["misaligned_lists"]:
        users = [int(r[0]) for r in ctx.rows(
            f"""SELECT user_id FROM sequences WHERE length > {int(ctx.max_history)} OR length < 1
                    OR len(item_ids) <> len(action_types) OR len(item_ids) <> len(timestamps) OR len(item_ids) <> length
                ORDER BY user_id LIMIT {NAMED}"""
        )]
        problems.append(
            f"{counts['too_long']} sequence(s) outside 1..{ctx.max_history} events and {counts['misaligned_lists']} with "
            f"lists of different lengths: {ctx.users_where(users)}"
        )
    if counts["target_leaks"]:
        users = [int(r[0]) for r in ctx.rows(
            f"""SELECT s.user_id FROM sequences s JOIN holdout h USING (user_id)
                WHERE s.last_position >= h.target_position ORDER BY s.user_id LIMIT {NAMED}"""
        )]
        leaks = counts["target_leaks"]
        problems.append(f"{leaks} training sequence(s) reach their user's target: users {_named(users, leaks)}")
    return _outcome(
        "sequences_valid", "sequences",
        f"non-empty; one row per user; history length 1..{ctx.max_history}, aligned lists, no target or later event in training",
        ERROR, suite, counts, problems,
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
    suite = validate_frame("holdout", frame, expectations) if len(frame) else _empty_suite()
    names = {0: "exposure", 1: "click", 2: "conversion"}
    empty = _empty(
        ctx, "holdout",
        f"no user has a target ({' or '.join(names.get(t, str(t)) for t in targets)}, action type "
        f"{' or '.join(str(t) for t in targets)} on track {ctx.track}), so nothing can be evaluated",
    )
    duplicates, duplicate_problem = _duplicate_users(ctx, "holdout")
    counts = {
        "empty_table": int(empty is not None),
        "duplicate_user_ids": duplicates,
        "target_not_in_candidates": ctx.count(
            "SELECT count(*) FROM holdout h ANTI JOIN candidates c ON c.item_id = h.target_item_id"
        ),
        "history_not_before_target": ctx.count(
            "SELECT count(*) FROM holdout WHERE list_max(history_timestamps) > target_timestamp"
        ),
    }
    return _outcome(
        "holdout_valid", "holdout",
        "non-empty; one target per user of the track's target types, history strictly before it, every target in candidates",
        ERROR, suite, counts, [p for p in (empty, duplicate_problem) if p],
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
    empty = _empty(ctx, "candidates", "no published pool and no item to build one from")
    counts = {
        "empty_table": int(empty is not None),
        "duplicate_creative_ids": ctx.count("SELECT count(*) - count(DISTINCT creative_id) FROM candidates"),
        "duplicate_retrieval_ids": ctx.count("SELECT count(*) - count(DISTINCT retrieval_id) FROM candidates"),
    }
    return _outcome(
        "candidates_valid", "candidates", "a non-empty pool of unique creative and retrieval ids", ERROR, suite,
        counts, [empty] if empty else None,
    )


def check_embeddings(ctx: CheckContext) -> CheckOutcome:
    E = _gx().expectations
    suites, counts, problems = {}, {}, []
    for family, dim, path in ctx.embedding_files:
        frame = ctx.frame(
            """SELECT creative_id, item_id, len(emb) AS dim,
                      NOT isfinite(coalesce(list_sum(emb), 'nan'::DOUBLE)) OR list_count(emb) <> len(emb) AS non_finite
               FROM read_parquet(?) WHERE hash(creative_id) % ? = 0""",
            [read_path(path), ctx.modulus],
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
        counts[f"family_{family}_wrong_dim"] = ctx.count(
            "SELECT count(*) FROM read_parquet(?) WHERE len(emb) <> ?", [read_path(path), dim]
        )
        # The sum of a vector is finite exactly when every element is (float32 values summed in
        # double cannot overflow), so one aggregate over the whole file finds NaN and infinities.
        non_finite = ctx.rows(
            """SELECT creative_id FROM read_parquet(?)
               WHERE NOT isfinite(coalesce(list_sum(emb), 'nan'::DOUBLE)) OR list_count(emb) <> len(emb)
               ORDER BY creative_id""",
            [read_path(path)],
        )
        counts[f"family_{family}_non_finite"] = len(non_finite)
        if non_finite:
            ids = [int(r[0]) for r in non_finite[:NAMED]]
            problems.append(
                f"family {family}: {len(non_finite)} vector(s) hold NaN, an infinity or a null: creative ids "
                f"{_named(ids, len(non_finite))}, from {_embedding_source(ctx, family)}"
            )
        if counts[f"family_{family}_wrong_dim"]:
            problems.append(f"family {family}: {counts[f'family_{family}_wrong_dim']} vector(s) not of dimension {dim} in {path}")
    success = all(s["success"] for s in suites.values())
    passed = success and all(c == 0 for c in counts.values())
    if not passed and not problems:
        problems.append("expectations failed on the sample")
    return CheckOutcome(
        "embeddings_valid", "item_embeddings", passed, ERROR,
        "every chosen family present, each vector of the family's dimension and finite (every vector counted)",
        {"ge": suites, "full_table_violations": counts},
        problems if not passed else [],
    )


def _embedding_source(ctx: CheckContext, family: int) -> str:
    """The raw files a family's vectors were read from."""
    if ctx.source_root is None or ctx.dataset_format is None:
        return "the raw dataset"
    from taac_dagster.readers.embeddings import find_embedding_source

    try:
        return str(find_embedding_source(ctx.source_root, ctx.dataset_format, family).path)
    except Exception:  # the source moved since the build: name the folder it was in
        return str(ctx.source_root)


CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("events_valid", "events", "events: non-empty, schema, ids, action types, one event per position, "
              "plausible time order, known items", ERROR, check_events_schema),
    CheckSpec("events_missing_action_types", "events", "events whose action type was null (kept as exposures)", WARN,
              check_events_missing_actions),
    CheckSpec("items_valid", "items", "items: non-empty, unique ids, feature values in vocabulary", ERROR, check_items),
    CheckSpec("users_valid", "users", "users: non-empty, unique ids, feature values in vocabulary", ERROR, check_users),
    CheckSpec("sequences_valid", "sequences", "sequences: non-empty, one per user, length <= max history, aligned, "
              "no target leak", ERROR, check_sequences),
    CheckSpec("holdout_valid", "holdout", "holdout: non-empty, one target per user, in candidates, history before it", ERROR,
              check_holdout),
    CheckSpec("candidates_valid", "candidates", "candidates: non-empty, unique ids", ERROR, check_candidates),
    CheckSpec("embeddings_valid", "item_embeddings", "embeddings: family dimension, finite values (every vector)", ERROR,
              check_embeddings),
)


def run_checks(
    warehouse: Path,
    track: str,
    *,
    max_history: int,
    sample_users: int,
    names: list[str] | None = None,
    settings: TaacSettings | None = None,
) -> list[CheckOutcome]:
    """Run the named checks (default: all) on a warehouse through a read-only connection."""
    from taac_dagster.db import connect
    from taac_dagster.warehouse import warehouse_source

    con = connect(warehouse, settings, read_only=True)
    try:
        n_users = int(con.execute("SELECT count(*) FROM users").fetchall()[0][0])
        modulus = max(1, math.ceil(n_users / sample_users))
        files = [
            (int(f), int(d), str(p))
            for f, d, p in con.execute("SELECT family, dim, path FROM embedding_families ORDER BY family").fetchall()
        ]
        source_root, dataset_format = warehouse_source(con)
        ctx = CheckContext(con, track, int(max_history), modulus, files, source_root, dataset_format)
        outcomes = []
        for spec in CHECKS:
            if names is None or spec.name in names:
                outcome = spec.run(ctx)
                outcome.metadata["sample_modulus"] = modulus
                outcomes.append(outcome)
        return outcomes
    finally:
        con.close()
