"""semantic_id_codebooks: RQ-KMeans Semantic IDs of every item and candidate of a track.

Thin: the work is ``models.semantic_ids.build_semantic_ids``. It writes the codebooks to
``<root>/<track>/codebooks/`` (atomically) and the ``item_semantic_ids`` table to the track's
warehouse (one transaction).
"""

import time

from dagster import AssetExecutionContext, AssetKey, MaterializeResult, MetadataValue, asset

from models.semantic_ids import TABLE, build_semantic_ids
from taac_dagster.partitions import track_partitions
from taac_dagster.resources import TaacConfig

# Bump when the same inputs and settings would give different codes or a different table or
# codebook layout (algorithm, defaults, collision or fallback rule, schema); not for logging,
# metadata or refactors that leave the outputs byte-for-byte the same.
SEMANTIC_IDS_CODE_VERSION = "semantic-ids-v1"


@asset(
    partitions_def=track_partitions,
    code_version=SEMANTIC_IDS_CODE_VERSION,
    group_name="semantic_ids",
    deps=[AssetKey("item_embeddings"), AssetKey("items"), AssetKey("candidates")],
    kinds={"python", "duckdb"},
    description="RQ-KMeans codebooks over one embedding family and a unique Semantic ID (code "
    f"tuple + disambiguation code) per item and candidate, in the table {TABLE}.",
)
def semantic_id_codebooks(context: AssetExecutionContext, taac: TaacConfig) -> MaterializeResult:
    track = context.partition_key
    started = time.perf_counter()
    result = build_semantic_ids(taac.paths(track), taac.settings(track), logger=context.log)
    metadata = result.to_metadata()
    recovery = metadata.pop("topic_recovery", None)
    return MaterializeResult(
        metadata={
            **{k: v for k, v in metadata.items() if not isinstance(v, (list, dict))},
            "utilization": MetadataValue.json(metadata["utilization"]),
            "reconstruction_error": MetadataValue.json(metadata["reconstruction_error"]),
            "seconds": MetadataValue.json(metadata["seconds"]),
            "total_seconds": round(time.perf_counter() - started, 2),
            "codebooks_dir": MetadataValue.path(metadata["codebooks_dir"]),
            "warehouse": MetadataValue.path(metadata["warehouse"]),
            **({"topic_recovery": MetadataValue.json(recovery)} if recovery is not None else {}),
        }
    )
