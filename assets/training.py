"""encoder_checkpoint: the retrieval encoder of a track, trained (or resumed) on its warehouse.

Thin: the work is ``taac_dagster.steps.training.train_track``. It prepares the training arrays once from the
DuckDB tables (``<root>/<track>/checkpoints/arrays/``, reused while the warehouse and the
Semantic IDs are unchanged), trains the preset chosen by ``TAAC_TRAINING__PRESET`` and writes
``<root>/<track>/checkpoints/<preset>/last.pt`` atomically. A run interrupted half way resumes
from its last checkpoint; a finished checkpoint of the same config and data is kept as is.
Progress (steps, loss, samples/s) goes to the Dagster log; the loss curve and the validation
figures next to the popularity baseline go to the materialization metadata.
"""

import os
import shlex
import sys
import time
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    PipesSubprocessClient,
    asset,
)

from assets.metadata import image_markdown
from assets.track_lock import hold_track
from models.report_plots import figure_png, training_curve_figure
from taac_dagster.automation import downstream_condition
from taac_dagster.code_versions import code_version
from taac_dagster.lineage import table_deps
from taac_dagster.partitions import track_partitions
from taac_dagster.resources import TaacConfig
from taac_dagster.settings import TaacSettings, training_overrides
from taac_dagster.steps import arrays, train_cli
from taac_dagster.steps.arrays import prepare_track_arrays
from taac_dagster.steps.training import checkpoint_metadata, progress_line, train_track

# Bump when the same inputs and settings would train a different model or write a different
# checkpoint layout (model code, loss, batching, optimizer, array preparation).
TRAINING_CODE_VERSION = code_version("training", __name__, data_files=["configs/tracks/*.yaml", "configs/models/*.yaml"])

# What the training arrays are prepared from (taac_dagster.steps.arrays): every step that loads
# them (training, the index, the user vectors, the report, the submission) reads these.
ARRAY_INPUTS = tuple(table_deps(arrays.TABLES_READ))


@asset(
    partitions_def=track_partitions,
    automation_condition=downstream_condition(),
    code_version=TRAINING_CODE_VERSION,
    group_name="training",
    deps=list(ARRAY_INPUTS),
    kinds={"pytorch"},
    description="The retrieval encoder (causal Transformer over user histories; full softmax over "
    "the catalogue, or sampled negatives with logQ on huge ones) trained on the track with early "
    "stopping on validation targets (each validation user's target before its test target); the "
    "checkpoint holds the best validated weights, the optimizer, config and data version (its "
    "data version names config, data and the kept step).",
)
def encoder_checkpoint(context: AssetExecutionContext, taac: TaacConfig) -> MaterializeResult:
    track = context.partition_key
    settings = taac.settings(track)
    if settings.training.launcher == "torchrun":
        return _train_with_torchrun(context, taac, track)
    started = time.perf_counter()
    with hold_track(context, taac, track):
        run = train_track(
            taac.paths(track), taac.settings(track), logger=context.log,
            on_log=lambda record: context.log.info(progress_line(record)),
        )
    total_seconds = time.perf_counter() - started  # with the arrays' preparation
    plot = _loss_curve_plot(run.result.loss_curve(), run.preset.name) if run.result.losses else None
    return MaterializeResult(
        data_version=DataVersion(run.result.checkpoint_version),
        metadata=checkpoint_metadata(run, total_seconds, plot),
    )


def _loss_curve_plot(curve: list[dict[str, float]], preset: str) -> MetadataValue:
    figure = training_curve_figure({preset: [(point["step"], point["loss"]) for point in curve]})
    return image_markdown({"training loss": figure_png(figure)})


def torchrun_command(
    settings: TaacSettings, track: str, python: str = sys.executable, *, arrays_dir: str | Path | None = None
) -> list[str]:
    """``torchrun -m taac_dagster.steps.train_cli`` for one node of ``nproc_per_node`` ranks, training on what the
    in-process path would: the prepared ``arrays_dir`` (else the ranks prepare the arrays from
    these settings), the run's whole settings (``--settings-json``, the secrets left out) and
    their training overrides (``training_overrides``, also shown as ``--set``; batch_size is the
    global batch over all ranks)."""
    training = settings.training
    command = [
        python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={training.nproc_per_node}",
        "-m", train_cli.__name__, "--config", training.preset, "--data-root", str(settings.data_root),
        "--track", track,
        "--settings-json", settings.model_dump_json(exclude={"hub_token"}),
    ]
    if arrays_dir is not None:
        command += ["--arrays", str(arrays_dir)]
    for key, value in training_overrides(settings).items():
        command += ["--set", f"train.{key}={value}"]
    return command


def _train_with_torchrun(context: AssetExecutionContext, taac: TaacConfig, track: str) -> MaterializeResult:
    """The cluster path: torchrun runs taac_dagster.steps.train_cli (DDP); its rank 0 reports through Pipes."""
    settings = taac.settings(track)
    # Prepared here, once, so that rank 0 does not build them while the other ranks wait at a
    # barrier (NCCL's default timeout is 10 minutes; the 10M arrays take longer on few cores).
    # The lock is held here, by the launching step, for the whole torchrun job: its ranks write
    # the checkpoint.
    with hold_track(context, taac, track):
        arrays = prepare_track_arrays(taac.paths(track), settings, logger=context.log)
        command = torchrun_command(settings, track, arrays_dir=arrays.folder)
        context.log.info("launching " + shlex.join(command))
        return PipesSubprocessClient(env=dict(os.environ)).run(command=command, context=context).get_materialize_result()
