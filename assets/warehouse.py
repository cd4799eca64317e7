"""The DuckDB warehouse of a track: one asset per table, built together, checked inline.

Write, audit, publish (``taac_dagster.warehouse.build_checked_warehouse``): the warehouse is
built under a temporary name, the quality checks run on that staged copy, and it replaces the
published ``warehouse.duckdb`` only when every blocking check passes. Otherwise the step fails
naming the checks and the rejected copy (kept under ``rejected/``); no table is materialized,
so nothing downstream runs, and the previous warehouse stays what the chain reads.
"""


from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetSpec,
    Failure,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from assets.metadata import parquet_metadata, table_metadata
from assets.raw import raw_dataset
from assets.track_lock import hold_track
from taac_dagster.automation import downstream_condition
from taac_dagster.code_versions import code_version
from taac_dagster.partitions import track_partitions
from taac_dagster.quality import CHECKS, ERROR, CheckOutcome
from taac_dagster.raw import RawManifest, verify_raw_files
from taac_dagster.readers.embeddings import families_text
from taac_dagster.resources import TaacConfig
from taac_dagster.warehouse import WAREHOUSE_TABLES, BlockingChecksFailed, build_checked_warehouse, embedding_paths

# The code version follows the SQL: editing a table's SQL file marks the tables stale.
WAREHOUSE_CODE_VERSION = code_version("warehouse", __name__, data_files=["configs/tracks/*.yaml", "sql/*.sql"])

TABLE_DESCRIPTIONS = {
    "feature_vocab": "Vocabulary size of every feature (re-ids run 1..size).",
    "events": "One row per interaction in source order; null action types kept as exposures.",
    "items": "Items: re-id, raw creative id, sparse features.",
    "users": "Users: re-id, raw id, sparse and multi-valued features.",
    "holdout": "Per user the retrieval target and the history strictly before it.",
    "sequences": "Per user the training history (<= max history) as aligned lists.",
    "candidates": "The retrieval pool with retrieval ids and cold-start flags.",
    "item_embeddings": "Multi-modal embeddings per chosen family, parquet beside the DuckDB file.",
}
WAREHOUSE_ASSETS = (*WAREHOUSE_TABLES, "item_embeddings")

warehouse_specs = [
    AssetSpec(
        name,
        deps=[raw_dataset],
        group_name="warehouse",
        code_version=WAREHOUSE_CODE_VERSION,
        automation_condition=downstream_condition(),
        description=TABLE_DESCRIPTIONS[name],
        kinds={"duckdb"} if name != "item_embeddings" else {"parquet"},
        partitions_def=track_partitions,
    )
    for name in WAREHOUSE_ASSETS
]

quality_check_specs = [
    AssetCheckSpec(check.name, asset=check.table, description=check.description, blocking=check.severity == ERROR)
    for check in CHECKS
]


@multi_asset(
    specs=warehouse_specs,
    check_specs=quality_check_specs,
    partitions_def=track_partitions,
    can_subset=False,
    name="warehouse_tables",
)
def warehouse_tables(context: AssetExecutionContext, taac: TaacConfig) -> Iterator[MaterializeResult | AssetCheckResult]:
    track = context.partition_key
    settings = taac.settings(track)
    paths = taac.paths(track)
    with hold_track(context, taac, track):
        manifest = RawManifest.read(paths.raw_manifest)
        try:
            summary, outcomes = build_checked_warehouse(
                Path(manifest.root), paths, settings, logger=context.log,
                verify_source=lambda: verify_raw_files(manifest, paths.raw_manifest),
            )
        except BlockingChecksFailed as failed:
            # The checks' verdicts are recorded (UI, automation) though nothing is published.
            yield from _check_results(failed.outcomes, rejected=str(failed.rejected))
            raise Failure(
                description=str(failed),
                metadata={"rejected_warehouse": MetadataValue.path(str(failed.rejected)),
                          "failed_checks": MetadataValue.json([o.name for o in failed.failed])},
            ) from None
    shared: dict[str, Any] = {"warehouse": MetadataValue.path(str(summary.path)), "raw_fingerprint": manifest.digest}
    with taac.duckdb(track) as con:  # the published warehouse: row counts and columns for the UI
        tables = {name: table_metadata(con, name, rows=summary.row_counts[name]) for name in WAREHOUSE_TABLES}
    for name in WAREHOUSE_TABLES:
        yield MaterializeResult(
            asset_key=name,
            metadata={**shared, **tables[name], "rows": summary.row_counts[name],
                      "seconds": round(summary.seconds.get(name, 0.0), 2)},
        )
    yield MaterializeResult(
        asset_key="item_embeddings",
        metadata={
            **shared,
            **parquet_metadata(list(embedding_paths(paths.warehouse, settings).values())),
            "families": MetadataValue.json({str(k): v for k, v in summary.embeddings.items()}),
            "families_selected": MetadataValue.json(summary.families),
            "families_requested": families_text(summary.families_requested),
            "folder": MetadataValue.path(str(summary.embeddings_folder or paths.embeddings)),
        },
    )
    yield from _check_results(outcomes)


def _check_results(outcomes: list[CheckOutcome], rejected: str | None = None) -> Iterator[AssetCheckResult]:
    for outcome in outcomes:
        metadata = {
            key: MetadataValue.json(value) if isinstance(value, (dict, list)) else value
            for key, value in outcome.metadata.items()
        }
        if rejected:
            metadata["rejected_warehouse"] = MetadataValue.path(rejected)
        yield AssetCheckResult(
            asset_key=outcome.table,
            check_name=outcome.name,
            passed=outcome.passed,
            severity=AssetCheckSeverity.ERROR if outcome.severity == ERROR else AssetCheckSeverity.WARN,
            description=outcome.description,
            metadata=metadata,
        )
