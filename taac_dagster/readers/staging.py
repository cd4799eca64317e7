"""The staging contract every reader fills, and the staging of ``indexer.pkl``.

Staging tables (regular DuckDB tables, dropped once the warehouse is built):

- ``stg_events(user_id, position, item_id, action_type, timestamp)``: interaction records,
  ``position`` 0..n-1 in source order within each user; ``action_type`` may be NULL (real
  data does that). A view where the source can be read directly (Hub parquet).
- ``stg_user_features(user_id, f103.., f106[]..)``: one row per user with a profile.
- ``stg_item_features(item_id, f100..)``: one row per item with features.
- ``stg_candidates(creative_id, retrieval_id, f100.., cold_features)``: the published pool, or
  no rows when the source has none.
- ``stg_item_index(creative_id, item_id)``, ``stg_user_index(raw_user_id, user_id)``,
  ``stg_feature_vocab(feature_id, vocab_size)``: from ``indexer.pkl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from taac_dagster.errors import DataFormatError
from taac_dagster.formats import (
    ITEM_SPARSE_FEATURES,
    RAW_ID_TYPE,
    USER_ARRAY_FEATURES,
    USER_SPARSE_FEATURES,
    feature_column,
    parse_raw_id,
)
from taac_dagster.safe_pickle import load_indexer

STAGING_TABLES = (
    "stg_events",
    "stg_jsonl_records",
    "stg_user_features",
    "stg_item_features",
    "stg_candidates",
    "stg_item_index",
    "stg_user_index",
    "stg_feature_vocab",
)


def drop_staging(con: duckdb.DuckDBPyConnection) -> None:
    kinds = dict(
        con.execute(
            "SELECT table_name, table_type FROM information_schema.tables WHERE table_name LIKE 'stg_%'"
        ).fetchall()
    )
    for name in STAGING_TABLES:  # views first: they read the tables after them
        if name in kinds:
            con.execute(f"DROP {'VIEW' if kinds[name] == 'VIEW' else 'TABLE'} {name}")


def create_empty_candidates(con: duckdb.DuckDBPyConnection) -> None:
    cols = ", ".join(f"{feature_column(f)} BIGINT" for f in ITEM_SPARSE_FEATURES)
    con.execute(
        f"CREATE OR REPLACE TABLE stg_candidates (creative_id BIGINT, retrieval_id BIGINT, "
        f"{cols}, cold_features INTEGER)"
    )


def _reids(mapping: dict[Any, Any], path: Path, what: str) -> np.ndarray:
    """The values of ``mapping`` (re-ids: integers from 1) as int64; the first that is not one
    is an error naming the map, its key and the value."""
    values = mapping.values()
    if all(type(v) is int for v in values):  # type(), not isinstance: True is not a re-id
        try:
            array = np.fromiter(values, dtype=np.int64, count=len(mapping))
        except OverflowError:
            array = None
        if array is not None and (not len(array) or int(array.min()) >= 1):
            return array
    for key, value in mapping.items():
        if type(value) is not int or not 1 <= value < 2**63:
            raise DataFormatError(
                path, f"{what} to map raw ids to re-ids (integers from 1 to 2^63-1)", f"{key!r:.60}: {value!r:.60}"
            )
    raise AssertionError("unreachable")


def _raw_creative_ids(mapping: dict[Any, Any], path: Path) -> np.ndarray:
    """The keys of ``indexer['i']`` (raw creative ids: integers or strings of digits) as int64."""
    try:
        return np.fromiter((parse_raw_id(k) for k in mapping), dtype=np.int64, count=len(mapping))
    except TypeError:  # parse_raw_id gave None for a key
        bad = next(k for k in mapping if parse_raw_id(k) is None)
        raise DataFormatError(path, f"raw creative ids ({RAW_ID_TYPE}) as the keys of indexer['i']", f"{bad!r:.60}") from None


def stage_indexer(con: duckdb.DuckDBPyConnection, path: Path) -> dict[str, int]:
    """Load ``indexer.pkl`` safely, check its ids and stage its maps; returns vocabulary sizes."""
    indexer = load_indexer(path)
    items, users, features = indexer["i"], indexer["u"], indexer["f"]
    item_index = pa.table(
        {
            "creative_id": _raw_creative_ids(items, path),
            "item_id": _reids(items, path, "indexer['i']"),
        }
    )
    user_index = pa.table(
        {
            "raw_user_id": pa.array([str(k) for k in users], pa.string()),
            "user_id": _reids(users, path, "indexer['u']"),
        }
    )
    sizes = []
    for fid, vocab in features.items():
        reids = _reids(vocab, path, f"indexer['f'][{fid!r}]")
        sizes.append(int(reids.max()) if len(reids) else 0)
    vocab = pa.table(
        {
            "feature_id": pa.array([str(fid) for fid in features], pa.string()),
            "vocab_size": pa.array(sizes, pa.int64()),
        }
    )
    con.register("_item_index", item_index)
    con.register("_user_index", user_index)
    con.register("_vocab", vocab)
    con.execute("CREATE OR REPLACE TABLE stg_item_index AS SELECT * FROM _item_index")
    con.execute("CREATE OR REPLACE TABLE stg_user_index AS SELECT * FROM _user_index")
    con.execute("CREATE OR REPLACE TABLE stg_feature_vocab AS SELECT * FROM _vocab")
    for name in ("_item_index", "_user_index", "_vocab"):
        con.unregister(name)
    return {"items": len(items), "users": len(users), "features": len(features)}


def user_feature_select(source: str, key: str) -> str:
    """SELECT list turning a JSON object column ``key`` of ``source`` into user feature columns."""
    sparse = [
        f"TRY_CAST({key}->>'$.\"{f}\"' AS BIGINT) AS {feature_column(f)}" for f in USER_SPARSE_FEATURES
    ]
    # A multi-valued feature may come as a list or, for a single value, a bare number.
    arrays = [
        f"""CASE json_type({key}, '$."{f}"')
                WHEN 'ARRAY' THEN CAST({key}->'$."{f}"' AS BIGINT[])
                WHEN 'UBIGINT' THEN [CAST({key}->>'$."{f}"' AS BIGINT)]
                WHEN 'BIGINT' THEN [CAST({key}->>'$."{f}"' AS BIGINT)]
                END AS {feature_column(f)}"""
        for f in USER_ARRAY_FEATURES
    ]
    return ", ".join(sparse + arrays) + f" FROM {source}"
