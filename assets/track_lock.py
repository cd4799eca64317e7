"""The track lock as every writing step takes it: named after the step and the run."""

from typing import Any

from dagster import AssetExecutionContext

from taac_dagster.locks import track_lock
from taac_dagster.resources import TaacConfig


def hold_track(context: AssetExecutionContext, taac: TaacConfig, track: str) -> Any:
    """Context manager holding ``<data root>/<track>/.lock`` for the step (see taac_dagster.locks)."""
    return track_lock(
        taac.paths(track).root,
        track=track,
        step=context.op_def.name,
        run_id=context.run_id,
        timeout=taac.settings(track).track_lock_timeout,
        logger=context.log,
    )
