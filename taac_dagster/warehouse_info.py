"""The ``warehouse_info`` table: what a warehouse was built from (track, format, source folder,
embedding families). The build writes it; the data-quality checks read the source back from it
to name the files a bad row came from."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import duckdb

from taac_dagster.readers.embeddings import families_text


def write_warehouse_info(
    con: duckdb.DuckDBPyConnection,
    track: str,
    dataset_format: str,
    source_root: Path,
    families: list[int],
    requested: list[int] | None,
) -> None:
    con.execute("CREATE OR REPLACE TABLE warehouse_info (key VARCHAR, value VARCHAR)")
    con.executemany(
        "INSERT INTO warehouse_info VALUES (?, ?)",
        [
            ["track", track],
            ["dataset_format", dataset_format],
            ["source_root", str(source_root)],
            ["embedding_families", families_text(families)],
            ["embedding_families_requested", families_text(requested)],
            ["built_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())],
            ["pid", str(os.getpid())],
        ],
    )


def warehouse_source(con: duckdb.DuckDBPyConnection) -> tuple[Path | None, str | None]:
    """(source folder, format) a warehouse was built from, as ``warehouse_info`` records them."""
    with contextlib.suppress(duckdb.Error):
        info = dict(con.execute("SELECT key, value FROM warehouse_info").fetchall())
        root = info.get("source_root")
        return (Path(root) if root else None), info.get("dataset_format")
    return None, None
