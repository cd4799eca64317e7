"""Facts about the two on-disk formats of the TencentGR data (docs/domain.md describes them).

Both formats carry the same ids: users, items and feature values are re-indexed from 1
(0 = padding) everywhere except in candidates and multi-modal embeddings, which use raw
creative ids, and in ``indexer.pkl``, which maps raw ids to re-ids.
"""

from __future__ import annotations

import re
from pathlib import Path

# Item sparse features. 111 behaves like an item id and exists in the competition format only.
ITEM_SPARSE_FEATURES: tuple[str, ...] = (
    "100", "101", "102", "111", "112", "114", "115", "116", "117", "118", "119", "120", "121", "122",
)
# The item features the encoder takes: every sparse one but the id-like 111.
ITEM_ID_LIKE_FEATURES: tuple[str, ...] = ("111",)
ITEM_MODEL_FEATURES: tuple[str, ...] = tuple(f for f in ITEM_SPARSE_FEATURES if f not in ITEM_ID_LIKE_FEATURES)
USER_SPARSE_FEATURES: tuple[str, ...] = ("103", "104", "105", "109")
USER_ARRAY_FEATURES: tuple[str, ...] = ("106", "107", "108", "110")
USER_FEATURES: tuple[str, ...] = USER_SPARSE_FEATURES + USER_ARRAY_FEATURES

# Multi-modal embedding families and their dimension in the 1M release. In the 10M release
# family 84 is 32-d; the dimension is always read from the folder name, these are defaults.
EMBEDDING_FAMILY_DIMS: dict[int, int] = {81: 32, 82: 1024, 83: 3584, 84: 4096, 85: 3584, 86: 3584}
# What the synthetic source writes and the Hub source downloads while embedding families are
# on auto: family 81 alone (0.9 GB of the 1M release's 128 GB of embeddings). Readers on auto
# then take every family the dataset holds.
DEFAULT_FETCH_FAMILIES: tuple[int, ...] = (81,)

HUB_FORMAT = "hub_parquet"
JSONL_FORMAT = "competition_jsonl"

# Competition format: one record of seq.jsonl.
JSONL_RECORD_FIELDS = ("user_id", "item_id", "user_feature", "item_feature", "action_type", "timestamp")

_EMB_DIR = re.compile(r"^emb_(\d+)_(\d+)(?:_parquet)?$")


def parse_embedding_dir(name: str) -> tuple[int, int] | None:
    """``emb_81_32`` or ``emb_81_32_parquet`` -> (81, 32); anything else -> None."""
    match = _EMB_DIR.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def feature_column(feature_id: str) -> str:
    """Column name used for a feature in the DuckDB tables (``f112``)."""
    return f"f{feature_id}"


def hub_embedding_dirs(root: Path) -> dict[int, tuple[int, Path]]:
    """Family -> (dim, folder) for the Hub layout ``mm_emb/emb_<family>_<dim>_parquet``."""
    found: dict[int, tuple[int, Path]] = {}
    base = root / "mm_emb"
    if base.is_dir():
        for child in sorted(base.iterdir()):
            parsed = parse_embedding_dir(child.name)
            if parsed and child.is_dir():
                found[parsed[0]] = (parsed[1], child)
    return found


def jsonl_embedding_sources(root: Path) -> dict[int, tuple[int, Path]]:
    """Family -> (dim, folder or .pkl) for the competition layout ``creative_emb/``."""
    found: dict[int, tuple[int, Path]] = {}
    base = root / "creative_emb"
    if base.is_dir():
        for child in sorted(base.iterdir()):
            stem = child.name[:-4] if child.suffix == ".pkl" else child.name
            parsed = parse_embedding_dir(stem)
            if parsed:
                found.setdefault(parsed[0], (parsed[1], child))
    return found


# --- Hub release (Parquet) layout -------------------------------------------------------
# Only the columns named here are required; extra columns are ignored. Feature columns are
# named by feature id ("100", ...); whichever are present are read.
import pyarrow as pa  # noqa: E402  (kept beside the schemas it defines)

# Raw creative ids (candidates, multi-modal embeddings) come as integers or as strings of
# digits: the Hub release stores mm_emb's anonymous_cid as a string. Both are read as BIGINT.
RAW_ID_TYPE = "integer or string of digits"  # integer: not uint64, see is_int64_compatible
_RAW_ID_TEXT = re.compile(r"[0-9]+", re.ASCII)


def is_int64_compatible(t: pa.DataType) -> bool:
    """An Arrow integer type whose every value fits BIGINT: any signed width, unsigned up to
    32 bits. uint64 is refused at the schema: its values above 2^63-1 have no BIGINT."""
    return pa.types.is_integer(t) and not pa.types.is_uint64(t)


INTEGER_TYPE = "integer (int8 to int64, or uint8 to uint32; not uint64)"


def is_raw_id_type(t: pa.DataType) -> bool:
    """An Arrow type a raw id column may have (integer, or a string to be parsed)."""
    return is_int64_compatible(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def raw_id_sql(column: str) -> str:
    """DuckDB expression: ``column`` as BIGINT, NULL when it is not an integer or digits.

    Digits only: TRY_CAST alone would also take ' 12', '1.0', '1e3' and '1_000', none of which is
    an id. An id too large for BIGINT is NULL too; callers report NULLs as bad input.
    """
    return f"CASE WHEN regexp_full_match(CAST({column} AS VARCHAR), '[0-9]+') THEN TRY_CAST({column} AS BIGINT) END"


def parse_raw_id(value: object) -> int | None:
    """A raw id from Python data (JSON, pickle): an int or a string of digits; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < 2**63 else None
    if isinstance(value, str) and _RAW_ID_TEXT.fullmatch(value) and int(value) < 2**63:
        return int(value)
    return None


HUB_SEQ_EVENT = pa.struct(
    [("item_id", pa.int64()), ("action_type", pa.int64()), ("timestamp", pa.int64())]
)
CANDIDATE_FEATURE_STRUCT = pa.struct([("feature_value", pa.int64()), ("cold_start", pa.bool_())])
