"""semantic_id_codebooks: RQ-KMeans Semantic IDs of every item and candidate of a track.

Thin: the work is ``taac_dagster.steps.semantic_ids.build_semantic_ids``. It writes the codebooks to
``<root>/<track>/codebooks/`` (atomically) and the ``item_semantic_ids`` table to the track's
warehouse (one transaction). Low content coverage is a WARN check, not a failure: the codes
then come from collaborative vectors and the chain goes on.
"""

import time

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.metadata import table_metadata
from assets.track_lock import hold_track
from taac_dagster.automation import downstream_condition
from taac_dagster.code_versions import code_version
from taac_dagster.lineage import table_deps
from taac_dagster.partitions import track_partitions
from taac_dagster.resources import TaacConfig
from taac_dagster.steps.semantic_id_tables import TABLE
from taac_dagster.steps.semantic_ids import TABLES_READ, build_semantic_ids

# Bump when the same inputs and settings would give different codes or a different table or
# codebook layout (algorithm, defaults, collision or fallback rule, schema); not for logging,
# metadata or refactors that leave the outputs byte-for-byte the same.
# v2: source auto (collaborative fallback), families on auto; v3: co-occurrence before each holdout user's own last target.
SEMANTIC_IDS_CODE_VERSION = code_version("semantic-ids", __name__, data_files=["configs/tracks/*.yaml"])

COVERAGE_CHECK = "semantic_ids_content_coverage"


@asset(
    partitions_def=track_partitions,
    automation_condition=downstream_condition(),
    code_version=SEMANTIC_IDS_CODE_VERSION,
    group_name="semantic_ids",
    deps=table_deps(TABLES_READ),
    kinds={"python", "duckdb"},
    check_specs=[
        AssetCheckSpec(
            COVERAGE_CHECK,
            asset="semantic_id_codebooks",
            description="The content embedding family covers enough items for content Semantic IDs "
            "(WARN: otherwise the codes come from collaborative vectors of the training sequences).",
        )
    ],
    description="RQ-KMeans codebooks over item vectors (an embedding family, or collaborative vectors "
    f"from the training sequences) and a unique Semantic ID (code tuple + disambiguation code) per "
    f"item and candidate, in the table {TABLE}.",
)
def semantic_id_codebooks(context: AssetExecutionContext, taac: TaacConfig) -> MaterializeResult:
    track = context.partition_key
    started = time.perf_counter()
    with hold_track(context, taac, track):
        result = build_semantic_ids(taac.paths(track), taac.settings(track), logger=context.log)
        with taac.duckdb(track) as con:  # the table's row count and columns, for the UI
            table = table_metadata(con, TABLE)
    metadata = result.to_metadata()
    recovery = metadata.pop("topic_recovery", None)
    collaborative = metadata.pop("collaborative", None)
    coverage = result.coverage
    return MaterializeResult(
        metadata={
            **table,
            **{k: v for k, v in metadata.items() if v is not None and not isinstance(v, (list, dict))},
            "utilization": MetadataValue.json(metadata["utilization"]),
            "reconstruction_error": MetadataValue.json(metadata["reconstruction_error"]),
            "seconds": MetadataValue.json(metadata["seconds"]),
            "total_seconds": round(time.perf_counter() - started, 2),
            "codebooks_dir": MetadataValue.path(metadata["codebooks_dir"]),
            "warehouse": MetadataValue.path(metadata["warehouse"]),
            **({"topic_recovery": MetadataValue.json(recovery)} if recovery is not None else {}),
            **({"collaborative": MetadataValue.json(collaborative)} if collaborative is not None else {}),
        },
        check_results=[
            AssetCheckResult(
                check_name=COVERAGE_CHECK,
                passed=coverage.sufficient,
                severity=AssetCheckSeverity.WARN,
                description=(
                    f"family {coverage.family if coverage.family is not None else '(none)'} covers "
                    f"{coverage.items_with_content:,} of {coverage.items:,} items ({coverage.share:.1%}; "
                    f"content codes need {coverage.min_items:,}); codes from {result.source}"
                ),
                metadata={
                    "coverage": round(coverage.share, 4),
                    "items_with_content": coverage.items_with_content,
                    "items": coverage.items,
                    "min_items": coverage.min_items,
                    "family": coverage.family if coverage.family is not None else "none",
                    "source": result.source,
                },
            )
        ],
    )
