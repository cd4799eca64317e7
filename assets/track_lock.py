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
    the file, line and fix in its metadata (``assets.failures``). Under the lock, what an
    earlier writer killed mid-publish left is rolled back or removed first."""
    with explained_failures(), track_lock(
        taac.paths(track).root,
        track=track,
        step=context.op_def.name,
        run_id=context.run_id,
        timeout=taac.settings(track).track_lock_timeout,
        logger=context.log,
    ):
        removed = recover_interrupted_writes(taac.paths(track).root)
        if removed:
            context.log.warning(f"removed {removed} leftovers of interrupted writes under {taac.paths(track).root}")
        yield
