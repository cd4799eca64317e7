"""The track lock as every writing step takes it: named after the step and the run."""

from collections.abc import Iterator
from contextlib import contextmanager

from dagster import AssetExecutionContext

from assets.failures import explained_failures
from taac_dagster.atomic import recover_interrupted_writes
from taac_dagster.locks import track_lock
from taac_dagster.resources import TaacConfig


@contextmanager
def hold_track(context: AssetExecutionContext, taac: TaacConfig, track: str) -> Iterator[None]:
    """Hold ``<data root>/<track>/.lock`` for the step (see taac_dagster.locks); the project's
    errors raised inside, the lock's own included, leave the step as ``dagster.Failure`` with
    the file, line and fix in its metadata (``assets.failures``). The step also claims the
    track's run lease, so no other run's step comes between two steps of this run, and tags the
    run with its data root, source and preset. Under the
    lock, what an earlier writer killed mid-publish left is rolled back or removed first."""
    with explained_failures(), track_lock(
        taac.paths(track).root,
        track=track,
        step=context.op_def.name,
        run_id=context.run_id,
        timeout=taac.settings(track).track_lock_timeout,
        logger=context.log,
        run_finished=lambda run_id: _run_finished(context, run_id),
        lease_ttl=taac.settings(track).run_lease_ttl,
    ):
        _tag_run(context, taac, track)
        removed = recover_interrupted_writes(taac.paths(track).root)
        if removed:
            context.log.warning(f"removed {removed} leftovers of interrupted writes under {taac.paths(track).root}")
        yield


def _run_finished(context: AssetExecutionContext, run_id: str) -> bool | None:
    """Whether the run ``run_id`` has ended, as this step's instance knows it (None: unknown,
    e.g. a run of another instance)."""
    run = context.instance.get_run_by_id(run_id)
    return None if run is None else run.is_finished


def _tag_run(context: AssetExecutionContext, taac: TaacConfig, track: str) -> None:
    """Tag the run with what makes its results comparable (the data root, the source, the model
    preset), so that runs of one partition with different settings can be told apart and
    filtered in the UI."""
    settings = taac.settings(track)
    tags = {"taac/data_root": str(settings.data_root), "taac/source": settings.source,
            "taac/preset": str(settings.training.preset)}
    run = context.instance.get_run_by_id(context.run_id)
    if run is not None and any(run.tags.get(key) != value for key, value in tags.items()):
        context.instance.add_run_tags(context.run_id, tags)
