"""The checks of the tables built from the events: items, users, sequences, holdout, candidates."""

from __future__ import annotations

from typing import Any

from taac_dagster.formats import ITEM_SPARSE_FEATURES, USER_ARRAY_FEATURES, USER_SPARSE_FEATURES, feature_column
from taac_dagster.quality.context import ERROR, NAMED, CheckContext, CheckOutcome, empty_problem, named
from taac_dagster.quality.suites import empty_suite, load_gx, suite_outcome, validate_frame
from taac_dagster.tracks import get_track


def _vocab(ctx: CheckContext) -> dict[str, int]:
    return {fid: int(size) for fid, size in ctx.con.execute("SELECT feature_id, vocab_size FROM feature_vocab").fetchall()}


def check_items(ctx: CheckContext) -> CheckOutcome:
    E = load_gx().expectations
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
    suite = validate_frame("items", frame, expectations) if len(frame) else empty_suite()
    return _keyed_table_outcome(ctx, "items_valid", "items", "item_id", suite, "no item has features or appears in an event")


def check_users(ctx: CheckContext) -> CheckOutcome:
    E = load_gx().expectations
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
    suite = validate_frame("users", frame, expectations) if len(frame) else empty_suite()
    return _keyed_table_outcome(ctx, "users_valid", "users", "user_id", suite, "no user has a profile or an event")


def _keyed_table_outcome(
    ctx: CheckContext, name: str, table: str, key: str, suite: dict[str, Any], why_empty: str
) -> CheckOutcome:
    """The outcome of a table keyed by ``key`` (items, users): its suite plus full-table counts
    of emptiness and duplicate keys."""
    empty = empty_problem(ctx, table, why_empty)
    counts = {
        "empty_table": int(empty is not None),
        f"duplicate_{key}s": ctx.count(f"SELECT count(*) - count(DISTINCT {key}) FROM {table}"),
    }
    return suite_outcome(
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
    E = load_gx().expectations
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
    suite = validate_frame("sequences", frame, expectations) if len(frame) else empty_suite()
    empty = empty_problem(ctx, "sequences", "no user has an event before its target to train on")
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
        problems.append(f"{leaks} training sequence(s) reach their user's target: users {named(users, leaks)}")
    return suite_outcome(
        "sequences_valid", "sequences",
        f"non-empty; one row per user; history length 1..{ctx.max_history}, aligned lists, no target or later event in training",
        ERROR, suite, counts, problems,
    )


def check_holdout(ctx: CheckContext) -> CheckOutcome:
    E = load_gx().expectations
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
    suite = validate_frame("holdout", frame, expectations) if len(frame) else empty_suite()
    names = {0: "exposure", 1: "click", 2: "conversion"}
    empty = empty_problem(
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
    return suite_outcome(
        "holdout_valid", "holdout",
        "non-empty; one target per user of the track's target types, history strictly before it, every target in candidates",
        ERROR, suite, counts, [p for p in (empty, duplicate_problem) if p],
    )


def check_candidates(ctx: CheckContext) -> CheckOutcome:
    E = load_gx().expectations
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
    empty = empty_problem(ctx, "candidates", "no published pool and no item to build one from")
    counts = {
        "empty_table": int(empty is not None),
        "duplicate_creative_ids": ctx.count("SELECT count(*) - count(DISTINCT creative_id) FROM candidates"),
        "duplicate_retrieval_ids": ctx.count("SELECT count(*) - count(DISTINCT retrieval_id) FROM candidates"),
    }
    return suite_outcome(
        "candidates_valid", "candidates", "a non-empty pool of unique creative and retrieval ids", ERROR, suite,
        counts, [empty] if empty else None,
    )
