"""The ``submission`` step: top-10 creative ids of the released pool per raw user id, validated
(models/submission.py) and written to ``<root>/<track>/reports/submission.json`` (renamed into
place). The users are those of a ``predict_seq.jsonl`` (the local source's, whole sequences as
histories), else the holdout users (histories before their targets); their vectors come from
``user_vectors``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.checkpoint_fit import EvaluationError
from models.data import holdout_batch
from models.metrics import K
from models.predict import PREDICT_FILE
from models.scoring import CHUNK_USERS, ScoringSetup, as_ids, encode_users, fill_lists, released_popularity
from models.submission import write_submission
from models.user_vectors import PREDICT, UserVectorsMismatchError, file_fingerprint
from taac_dagster.db import connect
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import TaacSettings
from taac_dagster.steps.predict import configured_predict_file, read_predict_inputs
from taac_dagster.steps.publish import publish_file
from taac_dagster.steps.scoring import scoring_setup
from taac_dagster.steps.user_vectors import stored_queries

log = logging.getLogger(__name__)

SUBMISSION_FILE = "submission.json"


def raw_user_ids(warehouse: Path, user_ids: np.ndarray, settings: TaacSettings | None = None) -> np.ndarray:
    """Raw user ids (object array) of user re-ids, from the warehouse's users table; a user
    the indexer does not name keeps its re-id."""
    con = connect(warehouse, settings, read_only=True)
    try:
        table = con.execute("SELECT user_id, raw_user_id FROM users WHERE raw_user_id IS NOT NULL").fetchnumpy()
    finally:
        con.close()
    ids = np.asarray(user_ids, dtype=np.int64)
    out = ids.astype(object)
    known = np.asarray(table["user_id"], dtype=np.int64)
    if len(known):
        order = np.argsort(known)
        pos = np.minimum(np.searchsorted(known[order], ids), len(known) - 1)
        found = known[order][pos] == ids
        raw = np.asarray(table["raw_user_id"], dtype=object)[order]
        out[found] = raw[pos[found]]
    return out


@dataclass
class _Recipients:
    """Who the submission is for: their raw ids, model inputs and user vectors."""

    source: str
    users: np.ndarray  # raw user ids
    inputs_of: Callable[[int, int], dict[str, np.ndarray]]  # model inputs of users lo..hi-1
    queries: np.ndarray  # [users, d]


def _predict_recipients(paths: TrackPaths, settings: TaacSettings, setup: ScoringSetup, predict_file: Path,
                        explicit: bool, logger: logging.Logger) -> _Recipients:
    """The users of ``predict_file``, with the vectors ``user_vectors`` encoded for it; a file
    passed explicitly that ``user_vectors`` did not encode is encoded now."""
    loaded, arrays = setup.loaded, setup.arrays
    inputs = read_predict_inputs(predict_file, arrays, settings=settings)
    n = len(inputs)
    try:
        queries = stored_queries(paths, loaded, arrays, PREDICT, fingerprint=file_fingerprint(predict_file))
    except UserVectorsMismatchError:
        if not explicit:
            raise
        logger.info(f"{predict_file} is not among the encoded user vectors: encoding its {n:,} users")
        queries = np.zeros((n, int(loaded.model.cfg.vector_dim)), np.float32)
        encode_users(loaded, inputs.slice, n, queries, setup.device, settings.evaluation.query_batch_size, logger,
                     "predict_seq")
    logger.info(f"recommending for the {n:,} users of {predict_file}")
    return _Recipients(f"predict_seq ({predict_file})", inputs.raw_user_ids, inputs.slice, queries)


def _holdout_recipients(paths: TrackPaths, settings: TaacSettings, setup: ScoringSetup) -> _Recipients:
    arrays = setup.arrays
    if setup.n_hold == 0:
        raise EvaluationError(
            f"{paths.warehouse}: the holdout table is empty and there is no {PREDICT_FILE}: no user to recommend for"
        )
    users = raw_user_ids(paths.warehouse, np.asarray(arrays.hold_users).astype(np.int64), settings)
    return _Recipients("holdout", users, lambda lo, hi: holdout_batch(arrays, np.arange(lo, hi)),
                       stored_queries(paths, setup.loaded, arrays))


def _top_lists(setup: ScoringSetup, recipients: _Recipients, exclude_history: bool, logger: logging.Logger) -> np.ndarray:
    """[users, K] pool positions: the index's top-K, holes filled from the released pool's most popular."""
    popular = released_popularity(setup.arrays, setup.loaded.actions, setup.released)  # the released pool only
    n = len(recipients.users)
    lists = np.empty((n, K), np.int64)
    started = time.perf_counter()
    for lo in range(0, n, CHUNK_USERS):
        hi = min(n, lo + CHUNK_USERS)
        history = setup.position[recipients.inputs_of(lo, hi)["items"]] if exclude_history else None
        exclude = as_ids(history, setup.creative) if history is not None else None
        top = setup.search.top_k(np.ascontiguousarray(recipients.queries[lo:hi]), exclude)
        lists[lo:hi] = fill_lists(top, popular, history)
        elapsed = time.perf_counter() - started
        logger.info(f"recommended for {hi:,}/{n:,} users ({hi / max(elapsed, 1e-9):,.0f} users/s so far)")
    return lists


def submission_for_track(paths: TrackPaths, settings: TaacSettings, *, logger: logging.Logger | None = None,
                         path: Path | None = None, predict_file: Path | None = None) -> dict[str, Any]:
    """Top-10 creative ids per user in the official format, validated and written atomically
    to ``reports/submission.json``. The users are those of ``predict_file`` (default: the local
    source's ``predict_seq.jsonl`` when it has one, whole sequences as histories), else the
    holdout users (histories before their targets). Their vectors come from ``user_vectors``;
    only a predict file passed here that ``user_vectors`` did not encode is encoded now."""
    logger = logger or log
    es = settings.evaluation
    setup = scoring_setup(paths, settings, logger, require_holdout=False)
    if len(setup.released_positions) < K:
        raise EvaluationError(
            f"{paths.warehouse}: the released candidate pool holds {len(setup.released_positions)} items; a submission "
            f"needs {K} distinct ones per user"
        )
    explicit = predict_file is not None
    predict_file = predict_file or configured_predict_file(settings)
    recipients = (_predict_recipients(paths, settings, setup, predict_file, explicit, logger) if predict_file is not None
                  else _holdout_recipients(paths, settings, setup))
    lists = _top_lists(setup, recipients, es.exclude_history, logger)
    target = path or Path(paths.reports) / SUBMISSION_FILE
    # Validated against the released pool: a target the warehouse added is never submitted.
    summary = write_submission(target, setup.creative[lists], recipients.users, setup.creative[setup.released_positions],
                               publish=publish_file)
    summary.update({"source": recipients.source, "checkpoint_version": setup.loaded.checkpoint_version,
                    "index": setup.search.describe(), "search_backend": setup.search.backend,
                    "released_candidates": len(setup.released_positions), "exclude_history": es.exclude_history})
    logger.info(f"submission for {summary['users']:,} users written to {target}")
    return summary


__all__ = ["SUBMISSION_FILE", "raw_user_ids", "submission_for_track"]
