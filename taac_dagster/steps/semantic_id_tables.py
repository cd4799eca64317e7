"""The Semantic IDs' side of a track's warehouse: the training sequences collaborative vectors
are learned from, and the ``item_semantic_ids`` table with its description, written in one
transaction (the build's commit point)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from taac_dagster.settings import TaacSettings
from taac_dagster.warehouse import connect_warehouse

TABLE = "item_semantic_ids"
INFO_TABLE = "item_semantic_ids_info"  # the codebooks' JSON, committed with the codes


def sequence_batches(
    warehouse: Path, settings: TaacSettings, target_priority: tuple[int, ...], users_per_batch: int = 20_000
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The ``sequences`` table's item lists as (flat item ids, lengths) batches of users.

    A holdout user's sequence is cut before its own last target (by the holdout's rule: the
    last event of the first action type of ``target_priority`` present): training may validate
    on that target (models/data.py), so codes learned from co-occurrence must not have seen it.
    The test target is never in ``sequences`` in the first place."""
    last = ", ".join(f"len(action_types) + 1 - list_position(list_reverse(action_types), {a})" for a in target_priority)
    query = f"""
        SELECT CASE WHEN h.user_id IS NULL OR coalesce({last}) IS NULL THEN s.item_ids
                    ELSE s.item_ids[1 : coalesce({last}) - 1] END AS item_ids
        FROM sequences s LEFT JOIN (SELECT user_id FROM holdout) h USING (user_id)
        ORDER BY s.user_id"""
    con = connect_warehouse(warehouse, settings, read_only=True)
    try:
        for batch in con.sql(query).to_arrow_reader(users_per_batch):
            items = batch.column(0)
            yield items.flatten().to_numpy(), items.value_lengths().fill_null(0).to_numpy()
    finally:
        con.close()


def _connect_for_write(path: Path, settings: TaacSettings, attempts: int = 20, wait: float = 1.0) -> duckdb.DuckDBPyConnection:
    """A read-write connection; retries while another process holds the file's lock."""
    for attempt in range(attempts):
        try:
            return connect_warehouse(path, settings)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(wait)
    raise AssertionError("unreachable")


def write_item_semantic_ids(
    path: Path, settings: TaacSettings, creative_ids: np.ndarray, item_ids: np.ndarray, codes: np.ndarray,
    has_embedding: np.ndarray, info: dict[str, Any] | None = None,
) -> None:
    """Replace ``item_semantic_ids`` and its description ``item_semantic_ids_info`` (the
    codebooks' JSON: levels, size, family, build id) in one transaction, on a connection
    opened for it alone: that commit is the Semantic IDs' publish, so a reader never sees
    codes of one build described by another."""
    levels = codes.shape[1]
    table = pa.table(
        {
            "creative_id": pa.array(creative_ids, pa.int64()),
            "item_id": pa.array(item_ids, pa.int64(), mask=item_ids < 0),
            "codes": pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1), pa.int32()), levels),
            "has_embedding": pa.array(has_embedding, pa.bool_()),
        }
    )
    con = _connect_for_write(path, settings)
    try:
        con.register("_semantic_ids", table)
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(
                f"""CREATE OR REPLACE TABLE {TABLE} (
                        creative_id BIGINT NOT NULL PRIMARY KEY, item_id BIGINT,
                        codes INTEGER[] NOT NULL, has_embedding BOOLEAN NOT NULL)"""
            )
            con.execute(
                f"""INSERT INTO {TABLE}
                    SELECT creative_id, item_id, CAST(codes AS INTEGER[]), has_embedding
                    FROM _semantic_ids ORDER BY creative_id"""
            )
            con.execute(f"CREATE OR REPLACE TABLE {INFO_TABLE} (info VARCHAR NOT NULL)")
            con.execute(f"INSERT INTO {INFO_TABLE} VALUES (?)", [json.dumps(info or {}, sort_keys=True, default=str)])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.unregister("_semantic_ids")
        con.execute("CHECKPOINT")
    finally:
        con.close()
