"""What the Dagster UI shows of an artifact besides its own figures.

- Tables: ``dagster/row_count`` and ``dagster/column_schema`` (the asset page's row count and
  columns), read from the published DuckDB table or parquet file.
- Plots: a PNG inlined in Markdown metadata (``![title](data:image/png;base64,...)``), so the
  loss curve, the recall tuning and the report's plots show on the asset page without opening
  a file.
- Data versions of artifacts derived from checkpoints: a digest of what determines them.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import DataVersion, MetadataValue, TableColumn, TableSchema

ROW_COUNT = "dagster/row_count"
COLUMN_SCHEMA = "dagster/column_schema"


def data_version_of(inputs: Any) -> DataVersion:
    """The data version of an artifact that ``inputs`` (JSON-serializable) fully determine."""
    return DataVersion(hashlib.blake2b(json.dumps(inputs, sort_keys=True).encode(), digest_size=8).hexdigest())


def table_metadata(con: duckdb.DuckDBPyConnection, table: str, rows: int | None = None) -> dict[str, Any]:
    """Row count (counted unless given) and column schema of a DuckDB table."""
    columns = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
        [table],
    ).fetchall()
    if rows is None:
        (rows,) = con.execute(f'SELECT count(*) FROM "{table}"').fetchall()[0]  # a name from the code, not input
    schema = TableSchema(columns=[TableColumn(name, str(kind)) for name, kind in columns])
    return {ROW_COUNT: int(rows), COLUMN_SCHEMA: MetadataValue.table_schema(schema)}


def parquet_metadata(files: list[Path]) -> dict[str, Any]:
    """Row count over parquet files of one layout and the schema of the first (no file: 0 rows)."""
    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
    schema: pa.Schema | None = pq.read_schema(files[0]) if files else None
    columns = [TableColumn(field.name, str(field.type)) for field in schema] if schema is not None else []
    return {ROW_COUNT: int(rows), COLUMN_SCHEMA: MetadataValue.table_schema(TableSchema(columns=columns))}


def image_markdown(images: Mapping[str, bytes]) -> MetadataValue:
    """PNG images, each under its title, as one Markdown metadata value."""
    parts = []
    for title, png in images.items():
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(f"**{title}**\n\n![{title}](data:image/png;base64,{encoded})")
    return MetadataValue.md("\n\n".join(parts))


def image_files_markdown(paths: Mapping[str, Path]) -> MetadataValue:
    """PNG files (e.g. the report's plots), inlined as ``image_markdown`` does."""
    return image_markdown({title: Path(path).read_bytes() for title, path in paths.items()})
