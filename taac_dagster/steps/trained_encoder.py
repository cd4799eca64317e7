"""What every step that scores with a trained encoder starts from: the device and threads the
settings ask for, the track's arrays, and a preset's checkpoint loaded and checked against them."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.allocator import keep_freed_memory
from models.checkpoint import LAST, load_encoder
from models.checkpoint_fit import EvaluationError, LoadedModel, check_checkpoint_fits
from models.data import Arrays
from models.distributed import pick_device
from models.retrieval import set_threads
from models.runtime import cpu_threads
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import TaacSettings
from taac_dagster.steps.arrays import prepare_track_arrays
from taac_dagster.steps.training import default_retrieval_actions

log = logging.getLogger(__name__)


def checkpoint_path(paths: TrackPaths, preset: str) -> Path:
    return Path(paths.checkpoints) / Path(preset).stem / LAST


def compute_device(settings: TaacSettings) -> torch.device:
    """The device for the encoder, with the torch and Faiss CPU threads the settings ask for."""
    torch.set_num_threads(cpu_threads(settings.training.threads))
    set_threads(settings.retrieval.threads)
    keep_freed_memory()  # activations of each forward pass come back from the heap (models/allocator.py)
    return pick_device(settings.training.device)


def track_arrays(paths: TrackPaths, settings: TaacSettings, logger: logging.Logger | None = None) -> Arrays:
    arrays = prepare_track_arrays(paths, settings, logger=logger or log)
    if int(arrays.meta["num_candidates"]) == 0:
        raise EvaluationError(
            f"{paths.warehouse}: the candidate pool (table candidates) is empty: nothing to index or recommend"
        )
    return arrays


def load_model(paths: TrackPaths, preset: str, arrays: Arrays, device: torch.device) -> LoadedModel:
    path = checkpoint_path(paths, preset)
    if not path.is_file():
        raise EvaluationError(
            f"{path}: no checkpoint of preset {preset!r} for track {paths.track}; materialize encoder_checkpoint "
            f"(with TAAC_TRAINING__PRESET={preset}) first"
        )
    # The model is rebuilt from the checkpoint's own config, so it loads whatever the data;
    # whether it fits these arrays is checked before anything is computed with it.
    model, ckpt = load_encoder(path, arrays, device)
    warnings = check_checkpoint_fits(ckpt, arrays, path)
    actions = tuple(ckpt.get("retrieval_actions") or default_retrieval_actions(paths.track))
    return LoadedModel(Path(preset).stem, path, model, ckpt, actions, warnings)


def comparison_preset(settings: TaacSettings) -> str | None:
    """The official-baseline preset the report compares with, unless it is the configured one."""
    name = settings.evaluation.baseline_preset
    return name if name and Path(name).stem != Path(settings.training.preset).stem else None


__all__ = ["checkpoint_path", "compute_device", "comparison_preset", "load_model", "track_arrays"]
