"""What the report and the submission score with: the track's arrays, the configured preset's
checkpoint and the index built from it, checked together, searched with the backend the
settings pick (``evaluation.search_backend``: Faiss on the CPU, or exact top-k in torch on a CUDA
device; models/scoring.py)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from models.checkpoint_fit import EvaluationError
from models.data import released_mask
from models.scoring import PoolSearch, ScoringSetup, pool_positions
from models.scoring import search_backend as pick_search_backend
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import TaacSettings
from taac_dagster.steps.index import open_track_index
from taac_dagster.steps.trained_encoder import compute_device, load_model, track_arrays


def search_backend(settings: TaacSettings, device: torch.device) -> str:
    """``faiss`` or ``torch-<device type>``, as ``evaluation.search_backend`` asks on ``device``."""
    return pick_search_backend(settings.evaluation.search_backend, device)


def scoring_setup(paths: TrackPaths, settings: TaacSettings, logger: logging.Logger, *,
                  require_holdout: bool = True) -> ScoringSetup:
    """The arrays, the configured checkpoint and the index built from it, checked together."""
    device = compute_device(settings)
    arrays = track_arrays(paths, settings, logger)
    loaded = load_model(paths, settings.training.preset, arrays, device)
    index = open_track_index(paths, loaded, arrays, settings.retrieval.threads)
    n_hold = int(arrays.meta["num_holdout"])
    if n_hold == 0 and require_holdout:
        raise EvaluationError(f"{paths.warehouse}: the holdout table is empty: no user to score")
    creative = np.asarray(arrays.cand_creative).astype(np.int64)
    released = released_mask(arrays)
    backend = search_backend(settings, device)
    logger.info(f"searching {index.spec.describe()} with {backend}; released pool: "
                f"{len(creative) if released is None else int(released.sum()):,} of {len(creative):,} candidates")
    return ScoringSetup(device, arrays, loaded, index, creative, pool_positions(arrays), n_hold, released,
                        PoolSearch.open(index, backend, device, released))


__all__ = ["scoring_setup", "search_backend"]
