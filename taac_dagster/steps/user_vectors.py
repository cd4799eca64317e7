"""The ``user_vectors`` step: every holdout user's (and every predict_seq.jsonl user's) query
vector, encoded once per checkpoint for the configured and the baseline preset, into
``<root>/<track>/vectors/<preset>/`` (the layout: models/user_vectors.py); and those vectors read
back for the report and the submission, refused unless they are the checkpoint's own.

Each preset's folder is written into a temporary folder beside it and renamed into place
(``atomic_dir``), so a crash leaves the previous vectors whole.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint_fit import CheckpointMismatchError, LoadedModel
from models.data import Arrays, holdout_batch
from models.predict import PredictInputs
from models.scoring import encode_users
from models.user_vectors import HOLDOUT, PREDICT, file_fingerprint, open_user_vectors, write_user_vectors
from taac_dagster.atomic import atomic_dir
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import TaacSettings
from taac_dagster.steps.predict import configured_predict_file, read_predict_inputs
from taac_dagster.steps.trained_encoder import checkpoint_path, comparison_preset, compute_device, load_model, track_arrays

log = logging.getLogger(__name__)


def vectors_path(paths: TrackPaths, preset: str) -> Path:
    return Path(paths.vectors) / Path(preset).stem


@dataclass
class UserVectorsBuild:
    """What ``encode_track_users`` wrote: per preset its folder, checkpoint and users per part."""

    presets: dict[str, dict[str, Any]]
    users: int  # users encoded, every preset and part together
    seconds: float
    notes: list[str]

    @property
    def users_per_second(self) -> float:
        return self.users / max(self.seconds, 1e-9)


@dataclass
class _Users:
    """The users to encode: the holdout's, and the predict file's when there is one."""

    arrays: Arrays
    n_hold: int
    predict: PredictInputs | None
    fingerprint: str | None  # of the predict file


def _encode_preset(loaded: LoadedModel, users: _Users, folder: Path, device: torch.device, batch_size: int,
                   logger: logging.Logger) -> int:
    """Encode every user with ``loaded`` into ``folder``; returns the users encoded."""
    arrays, n_hold, predict = users.arrays, users.n_hold, users.predict
    dim = int(loaded.model.cfg.vector_dim)
    meta = {"checkpoint_version": loaded.checkpoint_version, "arrays_data_version": arrays.data_version,
            "preset": loaded.preset, "dim": dim, "actions": list(loaded.actions)}
    with atomic_dir(folder) as tmp, write_user_vectors(tmp, meta) as writer:
        holdout = writer.part(HOLDOUT, n_hold, dim)
        encode_users(loaded, lambda lo, hi: holdout_batch(arrays, np.arange(lo, hi)), n_hold, holdout, device,
                     batch_size, logger, "holdout")
        holdout.flush()
        if predict is None:
            return n_hold
        out = writer.part(PREDICT, len(predict), dim, path=str(predict.path), fingerprint=users.fingerprint)
        encode_users(loaded, predict.slice, len(predict), out, device, batch_size, logger, "predict_seq")
        out.flush()
    return n_hold + len(predict)


def encode_track_users(paths: TrackPaths, settings: TaacSettings, *, logger: logging.Logger | None = None) -> UserVectorsBuild:
    """Encode every holdout user (and every user of the local source's predict_seq.jsonl) with
    the configured preset's checkpoint, and with the baseline preset's when it exists, into
    ``<root>/<track>/vectors/<preset>/`` (see models/user_vectors.py)."""
    logger = logger or log
    started = time.perf_counter()
    device = compute_device(settings)
    arrays = track_arrays(paths, settings, logger)
    predict_file = configured_predict_file(settings)
    users = _Users(
        arrays, int(arrays.meta["num_holdout"]),
        read_predict_inputs(predict_file, arrays, settings=settings) if predict_file is not None else None,
        file_fingerprint(predict_file) if predict_file is not None else None,
    )
    notes: list[str] = []
    presets = [settings.training.preset]
    baseline = comparison_preset(settings)
    if baseline and checkpoint_path(paths, baseline).is_file():
        presets.append(baseline)
    written: dict[str, dict[str, Any]] = {}
    total = 0
    for preset in presets:
        try:
            loaded = load_model(paths, preset, arrays, device)
        except CheckpointMismatchError as error:
            if preset == settings.training.preset:
                raise
            notes.append(f"The '{preset}' preset was left out: {error}")
            logger.warning(str(error))
            continue
        for warning in loaded.warnings:
            logger.warning(warning)
        folder = vectors_path(paths, loaded.preset)
        total += _encode_preset(loaded, users, folder, device, settings.evaluation.query_batch_size, logger)
        written[loaded.preset] = {"path": str(folder), "checkpoint_version": loaded.checkpoint_version,
                                  "holdout": users.n_hold, "predict": len(users.predict) if users.predict is not None else 0}
    seconds = time.perf_counter() - started
    logger.info(f"user vectors of {', '.join(written)} written in {seconds:.1f}s ({total / max(seconds, 1e-9):,.0f} users/s)")
    return UserVectorsBuild(written, total, seconds, notes)


def stored_queries(paths: TrackPaths, loaded: LoadedModel, arrays: Arrays, part: str = HOLDOUT,
                   fingerprint: str | None = None) -> np.ndarray:
    """The user vectors ``loaded`` encoded for ``part`` (refused unless they are its own)."""
    return open_user_vectors(
        vectors_path(paths, loaded.preset), part, checkpoint_version=loaded.checkpoint_version,
        arrays_data_version=arrays.data_version, dim=int(loaded.model.cfg.vector_dim), fingerprint=fingerprint,
    )


__all__ = ["UserVectorsBuild", "encode_track_users", "stored_queries", "vectors_path"]
