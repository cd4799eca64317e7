"""raw_dataset: the track's dataset from the configured source (synthetic, local or hub)."""


from dagster import (
    AssetExecutionContext,
    Backoff,
    DataVersion,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
)

from assets.track_lock import hold_track
from taac_dagster.code_versions import code_version
from taac_dagster.partitions import track_partitions
from taac_dagster.raw import materialize_raw
from taac_dagster.readers.embeddings import families_text
from taac_dagster.resources import TaacConfig

RAW_CODE_VERSION = code_version("raw", __name__, data_files=["configs/tracks/*.yaml"])
# The Hub download meets the network: a lost connection or an HTTP 5xx / 429 is retried after
# about 30 s, 1 and 2 minutes (finished files are kept, so a retry fetches only the rest). The
# project's own errors are retried only when transient (SourceUnavailableError.transient): a
# wrong repo, a token or bad data fail at once (assets.failures).
HUB_RETRY_POLICY = RetryPolicy(max_retries=3, delay=30, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)


@asset(
    partitions_def=track_partitions,
    code_version=RAW_CODE_VERSION,
    group_name="data",
    kinds={"python"},
    retry_policy=HUB_RETRY_POLICY,
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
