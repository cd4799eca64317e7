"""raw_dataset: the track's dataset from the configured source (synthetic, local or hub)."""


from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from assets.track_lock import hold_track
from taac_dagster.partitions import track_partitions
from taac_dagster.raw import materialize_raw
from taac_dagster.readers.embeddings import families_text
from taac_dagster.resources import TaacConfig

RAW_CODE_VERSION = "raw-v2"


@asset(
    partitions_def=track_partitions,
    code_version=RAW_CODE_VERSION,
    group_name="data",
    kinds={"python"},
    description="The raw TencentGR dataset of the track (Hub parquet or competition JSONL), "
    "with a content fingerprint as its data version.",
)
def raw_dataset(context: AssetExecutionContext, taac: TaacConfig) -> MaterializeResult:
    track = context.partition_key
    settings = taac.settings(track)
    with hold_track(context, taac, track):
        manifest = materialize_raw(settings, taac.paths(track), logger=context.log)
    return MaterializeResult(
        metadata={
            "source": manifest.source,
            "dataset_format": manifest.dataset_format,
            "path": MetadataValue.path(manifest.root),
            "fingerprint": manifest.digest,
            "files": manifest.files,
            "bytes": manifest.total_bytes,
            "sampled_files": manifest.sampled_files,
            "families": MetadataValue.json(manifest.families),
            "families_requested": families_text(manifest.families_requested),
            "details": MetadataValue.json(manifest.details),
            "seconds": manifest.seconds,
        },
        data_version=DataVersion(manifest.digest),
    )
