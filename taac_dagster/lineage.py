"""Which asset writes each warehouse table, so that an asset's ``deps`` follow the tables its
step reads: each step module that queries the warehouse declares them in ``TABLES_READ``, the
assets build their deps from those lists with ``table_deps``, and tests/test_lineage.py checks
every list against the SQL in the steps' source. A table the code starts reading without a
dep would let Dagster call the asset fresh after that table changed."""

from __future__ import annotations

from collections.abc import Iterable

from dagster import AssetKey

from taac_dagster.steps.semantic_id_tables import INFO_TABLE as SID_INFO_TABLE
from taac_dagster.steps.semantic_id_tables import TABLE as SID_TABLE
from taac_dagster.warehouse import WAREHOUSE_TABLES

EMBEDDING_FAMILIES_TABLE = "embedding_families"

TABLE_ASSETS: dict[str, str] = {
    **{table: table for table in WAREHOUSE_TABLES},  # warehouse_tables materializes one asset per table
    EMBEDDING_FAMILIES_TABLE: "item_embeddings",  # the families' index, written with their parquet files
    SID_TABLE: "semantic_id_codebooks",
    SID_INFO_TABLE: "semantic_id_codebooks",
}


def table_deps(tables: Iterable[str]) -> list[AssetKey]:
    """The assets that write ``tables``, each once, in the order first named."""
    keys: dict[str, None] = {}
    for table in tables:
        if table not in TABLE_ASSETS:
            raise KeyError(f"no asset writes the table {table!r}; known: {sorted(TABLE_ASSETS)}")
        keys[TABLE_ASSETS[table]] = None
    return [AssetKey(name) for name in keys]
