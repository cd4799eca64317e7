"""The retraining schedule: one run of the retraining job per track on a cron (default weekly)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dagster import DefaultScheduleStatus, RunRequest, ScheduleEvaluationContext, schedule

from taac_dagster.tracks import TRACK_NAMES

if TYPE_CHECKING:  # what define_asset_job returns; dagster exports no public name for it
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

RETRAIN_SCHEDULE_NAME = "taac_retraining"


def build_retraining_schedule(job: UnresolvedAssetJobDefinition, cron: str, *, enabled: bool = False):
    @schedule(
        name=RETRAIN_SCHEDULE_NAME,
        job=job,
        cron_schedule=cron,
        default_status=DefaultScheduleStatus.RUNNING if enabled else DefaultScheduleStatus.STOPPED,
        description=f"Retrains both tracks ({', '.join(TRACK_NAMES)}) on '{cron}': one run per track.",
    )
    def retraining(context: ScheduleEvaluationContext):
        tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
        for track in TRACK_NAMES:
            yield RunRequest(
                run_key=f"retrain-{tick}-{track}",
                partition_key=track,
                tags={"taac/trigger": RETRAIN_SCHEDULE_NAME, "taac/track": track},
            )

    return retraining
