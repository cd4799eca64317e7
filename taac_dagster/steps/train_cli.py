"""The training command line, also the torchrun entry point:

    python -m taac_dagster.steps.train_cli --config configs/models/default.yaml --data-root data --track 1M
    torchrun --nproc_per_node 2 -m taac_dagster.steps.train_cli --config configs/models/default.yaml ...

Rank 0 prepares (or reuses) the track's arrays unless ``--arrays`` names them; every rank then
trains its slice of each global batch (models/train.py). Launched by Dagster through Pipes,
rank 0 streams the training events to the run's log and reports the checkpoint at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models import distributed
from models.data import load_arrays
from models.train import TrainResult, train
from models.train_config import Preset
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import TaacSettings, load_settings, training_overrides
from taac_dagster.steps.arrays import prepare_track_arrays
from taac_dagster.steps.publish import publish_file
from taac_dagster.steps.training import load_preset, progress_line, track_run, write_json_report

log = logging.getLogger(__name__)


def parse_set_value(text: str) -> Any:
    """A ``--set`` value as YAML reads it, except that ``1e-3`` is a number: YAML 1.1 (PyYAML)
    reads a float only with a dot (``1.0e-3``) and would hand the optimizer a string."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_set_options(items: list[str], overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Put each ``--set model.KEY=VALUE`` / ``train.KEY=VALUE`` into ``overrides`` (its
    ``model`` and ``train`` sections) and return it; a malformed one stops the command."""
    for item in items:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in overrides or not name:
            raise SystemExit(f"--set {item!r}: expected model.KEY=VALUE or train.KEY=VALUE")
        overrides[section][name] = parse_set_value(value)
    return overrides


@contextlib.contextmanager
def pipes_session(info: distributed.DistInfo) -> Iterator[Any]:
    """Dagster Pipes on rank 0 of a process that Dagster launched (``None`` elsewhere): the
    training events stream to the run's log while the ranks train, and the checkpoint is
    reported at the end."""
    if not info.is_main or "DAGSTER_PIPES_CONTEXT" not in os.environ:
        yield None
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        yield pipes


def _report_through_pipes(pipes: Any, result: TrainResult) -> None:
    """Report the checkpoint as the asset's materialization (rank 0, launched through Pipes)."""
    pipes.report_asset_materialization(
        metadata={
            "checkpoint": {"raw_value": str(result.checkpoint), "type": "path"},
            "steps": result.steps,
            "planned_steps": result.planned_steps,
            "samples_per_second": round(result.samples_per_second, 1),
            "final_loss": round(result.losses[-1], 5) if result.losses else None,
            **{f"val_{k}": round(float(v), 5) for k, v in result.metrics.items()},
        },
        data_version=result.checkpoint_version,
    )


@dataclass
class Command:
    """What one ``python -m taac_dagster.steps.train_cli`` process (or torchrun rank) was asked to do."""

    preset: Preset
    track: str
    paths: TrackPaths
    # The run's settings (--settings-json, from assets.training.torchrun_command); None: the
    # environment's (TAAC_*) and the track's preset, read when the arrays are prepared.
    settings: TaacSettings | None
    arrays_dir: Path
    prepare: bool  # prepare (or reuse) the arrays first, on rank 0: no --arrays was given
    checkpoint_dir: Path
    resume: bool
    report: Path | None


def parse_command(argv: list[str] | None = None) -> Command:
    parser = argparse.ArgumentParser(description="Train the retrieval encoder on a track's warehouse.")
    parser.add_argument("--config", default="default", help="preset name (configs/models/) or YAML path")
    parser.add_argument("--data-root", default=None, help="default: the settings' data_root, else data")
    parser.add_argument("--track", default="1M")
    parser.add_argument("--arrays", default=None, help="prepared arrays folder (default: <root>/<track>/checkpoints/arrays, "
                        "prepared or reused first)")
    parser.add_argument("--settings-json", default=None, help="the run's settings (TaacSettings as JSON): the arrays are "
                        "prepared with them and their training overrides apply (under --set)")
    parser.add_argument("--checkpoint-dir", default=None, help="default: <root>/<track>/checkpoints/<preset>")
    parser.add_argument("--report", default=None, help="write losses and figures as JSON here (rank 0)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE or train.KEY=VALUE")
    args = parser.parse_args(argv)

    settings = TaacSettings.model_validate_json(args.settings_json) if args.settings_json else None
    overrides: dict[str, dict[str, Any]] = {"model": {}, "train": dict(training_overrides(settings)) if settings else {}}
    apply_set_options(args.set, overrides)
    if args.max_steps is not None:
        overrides["train"]["max_steps"] = args.max_steps
    if args.epochs is not None:
        overrides["train"]["epochs"] = args.epochs
    preset = load_preset(args.config, overrides)
    root = args.data_root or (settings.data_root if settings else "data")
    paths = TrackPaths(Path(root), args.track)
    return Command(
        preset=preset, track=args.track, paths=paths, settings=settings,
        arrays_dir=Path(args.arrays) if args.arrays else paths.checkpoints / "arrays", prepare=not args.arrays,
        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else paths.checkpoints / preset.name,
        resume=not args.no_resume, report=Path(args.report) if args.report else None,
    )


def main(argv: list[str] | None = None) -> None:
    command = parse_command(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    info = distributed.setup(command.preset.train.device)
    try:
        if info.is_main and command.prepare:  # the asset's arrays: its settings, else TAAC_* and the track's
            settings = command.settings or load_settings(command.track, {"data_root": str(command.paths.data_root)})
            prepare_track_arrays(command.paths, settings)
        distributed.barrier(info)
        arrays = load_arrays(command.arrays_dir)
        with pipes_session(info) as pipes:

            def on_log(record: dict[str, Any]) -> None:
                log.info(json.dumps(record))
                if pipes is not None:
                    pipes.log.info(progress_line(record))

            result = train(
                arrays, command.preset, track=track_run(command.track), checkpoint_dir=command.checkpoint_dir,
                resume=command.resume, info=info, on_log=on_log if info.is_main else (lambda r: None), writer=publish_file,
            )
            if pipes is not None:
                _report_through_pipes(pipes, result)
        if info.is_main and command.report:
            report = {
                "losses": result.losses, "evals": result.evals, "metrics": result.metrics, "steps": result.steps,
                "planned_steps": result.planned_steps, "best_step": result.best_step, "seconds": result.seconds,
                "samples_per_second": result.samples_per_second, "model_config": result.model_config,
                "world": info.world, "params": result.params, "arrays": str(arrays.folder),
                "data_version": arrays.data_version, "train_config": result.train_config,
            }
            write_json_report(command.report, report)
    finally:
        distributed.cleanup(info)


if __name__ == "__main__":
    main()
