"""The encoder_checkpoint step of one track: its preset and settings, its arrays, the training
run with checkpoints published atomically, the JSON report and the asset's metadata.

The model code (models/train.py) trains on arrays it is given; this module supplies what only
the pipeline knows: where the track's files live, its settings and target actions, the presets
in configs/models/, and ``taac_dagster.atomic`` to publish what the run writes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import MetadataValue

from models.data import Arrays
from models.train import TrainResult, train
from models.train_config import Preset, TrackRun, TrainConfig
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import TaacSettings, model_preset_file, model_preset_name, training_overrides
from taac_dagster.steps.arrays import prepare_track_arrays
from taac_dagster.steps.publish import publish_file
from taac_dagster.tracks import get_track

log = logging.getLogger(__name__)


def load_preset(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Preset:
    """A preset from configs/models/<name>.yaml (or a path): ``model:`` and ``train:`` sections.
    ``overrides`` = {"model": {...}, "train": {...}} on top."""
    path = model_preset_file(name_or_path)
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    overrides = overrides or {}
    model = {**(data.get("model") or {}), **(overrides.get("model") or {})}
    train = {**(data.get("train") or {}), **(overrides.get("train") or {})}
    return Preset(model_preset_name(path), model, TrainConfig.from_dict(train))


def default_retrieval_actions(track: str) -> tuple[int, ...]:
    """The track's target actions by priority: what validation ranks for by default."""
    return tuple(get_track(track).target_priority)


def track_run(track: str) -> TrackRun:
    """What ``models.train.train`` needs to know of ``track``: its name and target actions."""
    return TrackRun(track, default_retrieval_actions(track))


def progress_line(record: dict[str, Any]) -> str:
    """One training event as a line for a person (the Dagster log, in-process or through Pipes)."""
    event = record.get("event")
    if event == "progress":
        return (
            f"step {record['step']}/{record['of']} (epoch {record['epoch']}): loss {record['loss']:.4f}, "
            f"{record['samples_per_s']:.0f} sequences/s, {record['tokens_per_s']:.0f} tokens/s, lr {record['lr']:.2e}"
        )
    if event == "validation" and "hr@10" in record:
        return (
            f"validation at step {record['step']} ({record['users']} users, previous targets): HR@10 {record['hr@10']:.4f}, "
            f"NDCG@10 {record['ndcg@10']:.4f}, score {record['score']:.4f}; popularity HR@10 "
            f"{record['popularity_hr@10']:.4f}, score {record['popularity_score']:.4f}; best so far: step {record['best_step']}"
        )
    if event == "budget":
        return (
            f"time budget of {record['minutes']} minutes: {record['steps']} steps of the planned {record['planned_steps']} "
            f"fit ({record['step_seconds']:.4f} s a step, {record['validation_seconds']:.1f} s a validation); "
            f"validation every {record['validate_every']} steps"
        )
    if event == "members":
        return f"members auto: {record['members']} ({record['why']})"
    if event == "member":
        return f"training member {record['member'] + 1} of {record['members']} (seed {record['seed']})"
    if event == "ensemble" and "hr@10" in record:
        return (f"the {record['members']} members joined: validation HR@10 {record['hr@10']:.4f}, "
                f"NDCG@10 {record['ndcg@10']:.4f}, score {record['score']:.4f}")
    return json.dumps(record, default=str)


def write_json_report(path: Path, report: dict[str, Any]) -> None:
    """``report`` as indented JSON in ``path``, published atomically."""
    publish_file(path, lambda target: target.write_text(json.dumps(report, indent=2, default=str)))


@dataclass
class TrackTraining:
    preset: Preset
    arrays: Arrays
    result: TrainResult
    report_path: Path


def train_track(
    paths: TrackPaths, settings: TaacSettings, *, logger: logging.Logger | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> TrackTraining:
    """Prepare (or reuse) the track's arrays and train (or resume) the configured preset.

    ``settings.training`` picks the preset and overrides epochs, steps, batch size, device. The
    checkpoint goes to ``<root>/<track>/checkpoints/<preset>/last.pt``, a JSON report beside it.
    """
    logger = logger or log
    arrays = prepare_track_arrays(paths, settings, logger=logger)
    preset = load_preset(settings.training.preset, {"train": training_overrides(settings)})
    checkpoint_dir = paths.checkpoints / preset.name
    result = train(
        arrays, preset, track=track_run(paths.track), checkpoint_dir=checkpoint_dir, on_log=on_log, writer=publish_file
    )
    report_path = checkpoint_dir / "report.json"
    write_json_report(report_path, training_report(paths.track, preset, arrays, result))
    return TrackTraining(preset, arrays, result, report_path)


def training_report(track: str, preset: Preset, arrays: Arrays, result: TrainResult) -> dict[str, Any]:
    """What ``train_track`` writes beside the checkpoint (report.json)."""
    return {
        "track": track,
        "preset": preset.name,
        "config_hash": result.config_hash,
        "data_version": arrays.data_version,
        "steps": result.steps,
        "planned_steps": result.planned_steps,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "checkpoint_version": result.checkpoint_version,
        "resumed_from": result.resumed_from,
        "metrics": result.metrics,
        "evals": result.evals,
        "loss_curve": result.loss_curve(),
        "samples_per_second": result.samples_per_second,
        "tokens_per_second": result.tokens_per_second,
        "params": result.params,
        "model_config": result.model_config,
        "train_config": result.train_config,
    }


def checkpoint_metadata(run: TrackTraining, total_seconds: float, loss_curve_plot: MetadataValue | None) -> dict[str, Any]:
    """The encoder_checkpoint materialization's metadata (``loss_curve_plot``: the asset's
    picture of the loss curve, None when the run took no step)."""
    result, metrics = run.result, run.result.metrics
    figures = {k: round(float(metrics[k]), 5) for k in metrics if k != "users"}
    return {
        "checkpoint": MetadataValue.path(str(result.checkpoint)),
        "checkpoint_version": result.checkpoint_version,
        "report": MetadataValue.path(str(run.report_path)),
        "preset": run.preset.name,
        "config_hash": result.config_hash,
        "data_version": run.arrays.data_version,
        "steps": result.steps,
        "planned_steps": result.planned_steps,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "resumed_from_step": result.resumed_from,
        "train_seconds": round(result.seconds, 2),
        "total_seconds": round(total_seconds, 2),  # with the arrays' preparation
        "samples_per_second": round(result.samples_per_second, 1),
        "tokens_per_second": round(result.tokens_per_second, 1),
        **({"final_loss": round(result.losses[-1], 5)} if result.losses else {}),
        "loss_curve": MetadataValue.json(result.loss_curve()),
        **({"loss_curve_plot": loss_curve_plot} if loss_curve_plot is not None else {}),
        **{f"val_{key}": value for key, value in figures.items()},
        "val_users": int(metrics.get("users", 0)),
        "validation_history": MetadataValue.json(result.evals),
        "params": MetadataValue.json(result.params),
        "members": int(result.model_config.get("members", 1)),  # models in the ensemble (members: auto)
        "semantic_ids": bool(run.arrays.meta["sid_levels"]),
        "families": MetadataValue.json(run.arrays.meta["families"]),
        "model_config": MetadataValue.json(result.model_config),
    }
