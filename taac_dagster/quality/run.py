"""The checks in the order they run, and ``run_checks``, which runs them on a warehouse."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from taac_dagster.db import connect
from taac_dagster.quality.context import ERROR, WARN, CheckContext, CheckOutcome, CheckSpec
from taac_dagster.quality.embeddings import check_embeddings
from taac_dagster.quality.events import check_events_missing_actions, check_events_schema
from taac_dagster.quality.tables import check_candidates, check_holdout, check_items, check_sequences, check_users
from taac_dagster.warehouse_info import warehouse_source

if TYPE_CHECKING:
    from taac_dagster.settings import TaacSettings

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
