"""The retraining schedule: one run of the retraining job per track on a cron (default weekly)."""

from dagster import DefaultScheduleStatus, JobDefinition, RunRequest, ScheduleEvaluationContext, schedule

from taac_dagster.tracks import TRACK_NAMES

RETRAIN_SCHEDULE_NAME = "taac_retraining"


def build_retraining_schedule(job: JobDefinition | object, cron: str, *, enabled: bool = False):
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
