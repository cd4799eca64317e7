"""Asset jobs. Each is partitioned by track: pass the track as the run's partition."""

from dagster import AssetSelection, define_asset_job

from taac_dagster.partitions import track_partitions

DATA_ASSETS = AssetSelection.groups("data", "warehouse")
# Everything after the data: codebooks, encoder, index, user vectors, report, submission.
RETRAIN_ASSETS = AssetSelection.all() - DATA_ASSETS

# The whole chain. Later stages (codebooks, training, retrieval, reports) join the chain by
# being defined: this selection takes every asset.
main_job = define_asset_job(
    "taac_main",
    selection=AssetSelection.all(),
    partitions_def=track_partitions,
    description="The whole chain for one track: raw data -> tables and checks -> codebooks -> encoder -> index and user "
    "vectors -> report and submission.",
)

data_job = define_asset_job(
    "taac_data",
    selection=DATA_ASSETS,
    partitions_def=track_partitions,
    description="Raw dataset -> DuckDB tables -> data-quality checks, for one track.",
)

retrain_job = define_asset_job(
    "taac_retrain",
    selection=RETRAIN_ASSETS,
    partitions_def=track_partitions,
    description="Semantic ID codebooks -> encoder checkpoint -> Faiss index and user vectors -> evaluation report and "
    "submission, for one track.",
)
