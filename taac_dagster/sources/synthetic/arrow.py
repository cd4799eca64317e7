"""Arrow building blocks of the writers: masked and list columns, row-group-wise parquet, and
text assembled column-wise (JSON lines without a per-row Python loop)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

LARGE_STRING = pa.large_string()


def masked_int64(values: np.ndarray, present: np.ndarray) -> pa.Array:
    return pa.array(values.astype(np.int64, copy=False), type=pa.int64(), mask=~present)


def int_list(offsets: np.ndarray, values: np.ndarray, present: np.ndarray | None = None) -> pa.Array:
    mask = None if present is None else pa.array(~present)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=pa.int64()), mask=mask)


def write_parquet_blocks(path: Path, tables: Iterator[pa.Table], **options: Any) -> None:
    """One row group per table; ``options`` go to pq.ParquetWriter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer: pq.ParquetWriter | None = None
    try:
        for table in tables:
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, **options)
            writer.write_table(table, row_group_size=max(1, table.num_rows))
    finally:
        if writer is not None:
            writer.close()


def literal(value: str) -> pa.Scalar:
    return pa.scalar(value, LARGE_STRING)


def concat(*parts: pa.Array | pa.Scalar) -> pa.Array:
    return pc.binary_join_element_wise(*parts, literal(""))


def int_text(values: np.ndarray, present: np.ndarray | None = None) -> pa.Array:
    mask = None if present is None else ~present
    return pc.cast(pa.array(values, type=pa.int64(), mask=mask), LARGE_STRING)


def json_object(pieces: list[pa.Array]) -> pa.Array:
    """'{' + the non-null '"key": value' pieces joined by ', ' + '}'. Joined as 32-bit strings:
    pyarrow drops all-null rows when it skips nulls over large strings."""
    small = [pc.cast(p, pa.string()) for p in pieces]
    body = pc.binary_join_element_wise(*small, ", ", null_handling="skip")
    return concat(literal("{"), pc.cast(body, LARGE_STRING), literal("}"))


def join_lines(lines: pa.Array, separator: str) -> pa.Buffer:
    whole = pa.LargeListArray.from_arrays(pa.array([0, len(lines)], type=pa.int64()), lines)
    return pc.binary_join(whole, literal(separator))[0].as_buffer()
