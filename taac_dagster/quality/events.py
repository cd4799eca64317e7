"""The checks of the ``events`` table."""

from __future__ import annotations

from typing import Any

from taac_dagster.quality.context import ERROR, NAMED, WARN, CheckContext, CheckOutcome, empty_problem
from taac_dagster.quality.suites import empty_suite, load_gx, suite_outcome, validate_frame
from taac_dagster.tracks import get_track

# Timestamps are Unix seconds: before 2100-01-01 (milliseconds of 2025 are ~1.7e12), and the
# whole dataset within 2^31 - 1 seconds (68 years): training stores them as int32 offsets.
MAX_PLAUSIBLE_TIMESTAMP = 4_102_444_800
MAX_TIMESTAMP_SPAN = 2**31 - 1


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


def _events_suite(ctx: CheckContext, allowed: list[int]) -> dict[str, Any]:
    """The expectations on the sampled users' events, each with its previous timestamp and
    whether its item is in ``items``."""
    E = load_gx().expectations
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
    return validate_frame("events", frame, expectations) if len(frame) else empty_suite()


def check_events_schema(ctx: CheckContext) -> CheckOutcome:
    allowed = list(get_track(ctx.track).allowed_actions)
    suite = _events_suite(ctx, allowed)
    in_set = ", ".join(str(a) for a in allowed)
    problems = []
    empty = empty_problem(ctx, "events", "the dataset holds no interaction records")
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
    return suite_outcome(
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
