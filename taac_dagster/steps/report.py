"""The ``evaluation_report`` step: every holdout user's top-10 from the index, HR@10, NDCG@10,
Score (w-* on 10M) for the model, popularity, the baseline preset and the oracle; slices, plots
-> ``<root>/<track>/reports/evaluation.{md,html,json}`` (each file renamed into place).

The users' vectors are read from ``user_vectors``, not encoded again; the scoring run itself
(chunks of users, every method's lists) is models/holdout_scoring.py. Every row but one
recommends from the released pool, so a target outside it is a miss, as on the leaderboard; the
share of such targets is reported (``targets_outside_pool_share``), and ``model_extended``
("model (pool + missing targets)") scores the model on the whole index when the pools differ.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.baselines import NextItemTruth
from models.checkpoint_fit import CheckpointMismatchError, LoadedModel, kept_validation
from models.data import Arrays, released_mask
from models.holdout_scoring import EvaluationRun, headline, score_users, slice_table, targets_outside_pool
from models.report import ReportData, ReportFiles, write_report
from models.report_figures import oracle_share
from models.scoring import PoolSearch, ScoringSetup, released_popularity, sample_rows
from models.train import loss_curve
from models.user_vectors import UserVectorsMismatchError
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import TaacSettings
from taac_dagster.sources.synthetic import GROUND_TRUTH_DIR, load_ground_truth
from taac_dagster.steps.index import index_model_pool
from taac_dagster.steps.publish import publish_file
from taac_dagster.steps.scoring import scoring_setup, search_backend
from taac_dagster.steps.trained_encoder import checkpoint_path, comparison_preset, load_model
from taac_dagster.steps.user_vectors import stored_queries
from taac_dagster.tracks import get_track

log = logging.getLogger(__name__)

REPORT_NAME = "evaluation"


@dataclass
class Evaluation:
    files: ReportFiles
    headline: dict[str, dict[str, float]]
    oracle_share: dict[str, float]
    users: int
    seconds: dict[str, float]
    provenance: dict[str, Any]
    notes: list[str]
    validation: dict[str, Any] | None = None  # the kept checkpoint's validation figures
    targets_outside_pool_share: float = 0.0  # scored targets outside the released pool

    @property
    def search_backend(self) -> str:
        return str(self.provenance["search_backend"])


def _oracle_truth(paths: TrackPaths, settings: TaacSettings) -> NextItemTruth | None:
    if settings.source != "synthetic":
        return None
    folder = Path(paths.raw_for("synthetic")) / GROUND_TRUTH_DIR
    return load_ground_truth(folder) if folder.is_dir() else None


def _baseline(paths: TrackPaths, settings: TaacSettings, arrays: Arrays, device: torch.device,
              notes: list[str], logger: logging.Logger) -> tuple[LoadedModel, PoolSearch, np.ndarray] | None:
    """The official-baseline preset, scored like the model, when its checkpoint (and its user
    vectors) exist."""
    name = comparison_preset(settings)
    if name is None:
        return None
    if not checkpoint_path(paths, name).is_file():
        notes.append(f"No checkpoint of the '{name}' preset: train it with TAAC_TRAINING__PRESET={name} to see it here.")
        return None
    try:
        loaded = load_model(paths, name, arrays, device)
        queries = stored_queries(paths, loaded, arrays)
    except (CheckpointMismatchError, UserVectorsMismatchError) as error:
        notes.append(f"The '{name}' preset was left out: {error}")
        logger.warning(str(error))
        return None
    index, recall, _, _ = index_model_pool(loaded, arrays, settings, device, logger, {})
    pool_search = PoolSearch.open(index, search_backend(settings, device), device, released_mask(arrays))
    notes.append(
        f"The '{name}' preset ({loaded.checkpoint_version}) is searched with {pool_search.describe()} "
        f"({pool_search.backend}), recall@10 {recall:.4f}."
    )
    return loaded, pool_search, queries


def _evaluation_run(paths: TrackPaths, settings: TaacSettings, logger: logging.Logger,
                    setup: ScoringSetup, notes: list[str]) -> EvaluationRun:
    """The users to score and every comparison method's inputs (notes on what was left out go to ``notes``)."""
    es, track = settings.evaluation, get_track(paths.track)
    rows = sample_rows(setup.n_hold, es.max_users, settings.retrieval.seed) if es.max_users else np.arange(setup.n_hold)
    queries = stored_queries(paths, setup.loaded, setup.arrays)
    baseline = _baseline(paths, settings, setup.arrays, setup.device, notes, logger)
    cand_rows = np.asarray(setup.arrays.cand_rows).astype(np.int64)
    return EvaluationRun(
        setup=setup, rows=rows, queries=queries, baseline=baseline, truth=_oracle_truth(paths, settings),
        popular=released_popularity(setup.arrays, setup.loaded.actions, setup.released),
        pool_item_ids=np.where(cand_rows < int(setup.arrays.meta["id_rows"]), cand_rows, 0),
        exclude_history=es.exclude_history, relevance=dict(track.relevance) if track.weighted else None,
    )


def _training_curves(run: EvaluationRun) -> dict[str, list[tuple[float, float]]] | None:
    curves = {"model": [(p["step"], p["loss"]) for p in loss_curve(run.setup.loaded.ckpt.get("losses") or [])]}
    if run.baseline:
        curves["baseline"] = [(p["step"], p["loss"]) for p in loss_curve(run.baseline[0].ckpt.get("losses") or [])]
    return curves if any(curves.values()) else None


def _pool_note(run: EvaluationRun, outside_share: float) -> str:
    setup = run.setup
    released, total = len(setup.released_positions), len(setup.creative)
    if setup.released is None:
        return (f"Every row recommends from the released pool ({total:,} candidates); "
                f"{100 * outside_share:.1f}% of the targets are outside it.")
    return (f"Every row but 'model (pool + missing targets)' recommends from the released pool ({released:,} of "
            f"{total:,} candidates; the other {total - released:,} are holdout targets the warehouse added): "
            f"{100 * outside_share:.1f}% of the targets are outside it and count as misses, as on the leaderboard. "
            "'model (pool + missing targets)' searches the whole pool (an optimistic local figure).")


def _closing_notes(run: EvaluationRun, settings: TaacSettings, outside_share: float) -> list[str]:
    es, notes = settings.evaluation, [_pool_note(run, outside_share)]
    if es.exclude_history:
        notes.append(
            "History filter on: items already in a user's history are never recommended (as in the official evaluation)."
        )
    else:
        notes.append("History filter off: items from a user's history may be recommended.")
    if run.truth is None:
        notes.append("No oracle: the data is not synthetic (the ceiling needs the generator's ground truth).")
    if es.max_users:
        notes.append(f"Scored a deterministic sample of {len(run.rows):,} of the {run.setup.n_hold:,} holdout users "
                     "(TAAC_EVALUATION__MAX_USERS).")
    return notes


def _provenance(paths: TrackPaths, settings: TaacSettings, run: EvaluationRun, code_version: str,
                outside_share: float) -> dict[str, Any]:
    setup = run.setup
    return {
        "code_version": code_version,
        "track": paths.track,
        "source": settings.source,
        "data_version": setup.arrays.data_version,
        "checkpoint_version": setup.loaded.checkpoint_version,
        "checkpoint": str(setup.loaded.path),
        "preset": setup.loaded.preset,
        "index": setup.search.describe(),
        "search_backend": setup.search.backend,
        "exclude_history": settings.evaluation.exclude_history,
        "users": len(run.rows),
        "candidates": len(setup.creative),
        "released_candidates": len(setup.released_positions),
        "config": {
            "training": settings.training.model_dump(),
            "retrieval": settings.retrieval.model_dump(),
            "evaluation": settings.evaluation.model_dump(),
        },
        "figures": {"index_recall@10": setup.index.metadata.get("recall"),
                    "targets_outside_pool_share": round(outside_share, 6)},
    }


def evaluate_track(paths: TrackPaths, settings: TaacSettings, *, code_version: str = "",
                   logger: logging.Logger | None = None) -> Evaluation:
    """Score every holdout user (see module doc) and write the report under ``paths.reports``."""
    logger = logger or log
    started = time.perf_counter()
    setup = scoring_setup(paths, settings, logger)
    notes = list(setup.loaded.warnings)
    run = _evaluation_run(paths, settings, logger, setup, notes)
    scores = score_users(run, logger, started)
    figures = headline(scores)
    outside = float(targets_outside_pool(run).mean()) if len(run.rows) else 0.0
    notes += _closing_notes(run, settings, outside)
    provenance = _provenance(paths, settings, run, code_version, outside)
    seconds = {**scores.seconds, "total": round(time.perf_counter() - started, 3)}
    validation = kept_validation(setup.loaded.ckpt)
    data = ReportData(
        track=paths.track, headline=figures, slices=slice_table(run, scores), provenance=provenance,
        training_curve=_training_curves(run), notes=notes, validation=validation,
    )
    files = write_report(paths.reports, data, name=REPORT_NAME, publish=publish_file)
    logger.info(f"report written to {files.markdown} in {seconds['total']:.1f}s")
    return Evaluation(files, figures, oracle_share(figures), len(run.rows), seconds, provenance, notes, validation,
                      targets_outside_pool_share=outside)


__all__ = ["REPORT_NAME", "Evaluation", "evaluate_track"]
