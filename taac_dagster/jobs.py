"""Asset jobs. Each is partitioned by track: pass the track as the run's partition."""

from dagster import AssetSelection, define_asset_job

from taac_dagster.partitions import track_partitions

DATA_ASSETS = AssetSelection.groups("data", "warehouse")
# Everything after the data: codebooks, encoder, index, user vectors, report, submission.
RETRAIN_ASSETS = AssetSelection.all() - DATA_ASSETS

# A run past its maximum run time is stopped by Dagster's run monitoring (enabled in
# deploy/dagster.local.yaml), so a hung step (a stalled network, a wedged worker) cannot hold a
# track's lock and lease for good. Sized for 10M on one node with a day of training; a run may
# set its own `dagster/max_runtime` tag (seconds) in the Launchpad.
MAX_RUNTIME_HOURS = {"taac_main": 36, "taac_data": 12, "taac_retrain": 30}


def _max_runtime(job: str) -> dict[str, str]:
    return {"dagster/max_runtime": str(MAX_RUNTIME_HOURS[job] * 3600)}


# The whole chain. Later stages (codebooks, training, retrieval, reports) join the chain by
# being defined: this selection takes every asset.
main_job = define_asset_job(
    "taac_main",
    selection=AssetSelection.all(),
    partitions_def=track_partitions,
    tags=_max_runtime("taac_main"),
    description="The whole chain for one track: raw data -> tables and checks -> codebooks -> encoder -> index and user "
    "vectors -> report and submission.",
)

data_job = define_asset_job(
    "taac_data",
    selection=DATA_ASSETS,
    partitions_def=track_partitions,
    tags=_max_runtime("taac_data"),
    description="Raw dataset -> DuckDB tables -> data-quality checks, for one track.",
)

retrain_job = define_asset_job(
    "taac_retrain",
    selection=RETRAIN_ASSETS,
    partitions_def=track_partitions,
    tags=_max_runtime("taac_retrain"),
    description="Semantic ID codebooks -> encoder checkpoint -> Faiss index and user vectors -> evaluation report and "
    "submission, for one track.",
)
