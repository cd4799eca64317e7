"""The evaluation's scoring run: every method's top-10 for every scored holdout user, ranked
against the targets, one chunk of users at a time (``CHUNK_USERS``), so memory stays flat at 1M
users. The model's lists come from the index (``ScoringSetup.search``) over user vectors read,
not encoded; the comparison rows (popularity, the baseline preset, the oracle) are scored on the
same chunks under the same history filter.

The methods are the rows of the report (``SCORING_METHODS``). Every row recommends from the
released pool but ``model_extended``: the model on the whole index, targets the warehouse added
included (only when there are some). On 10M the weighted figures are computed too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.baselines import NextItemTruth, oracle_topk, popularity_topk
from models.checkpoint_fit import LoadedModel
from models.data import Arrays, holdout_batch
from models.metrics import K, score, target_ranks
from models.report_figures import headline_figures, slice_frame, slice_metrics
from models.scoring import CHUNK_USERS, PoolSearch, ScoringSetup, as_ids
from models.weighted_metrics import PAD, relevance_weights, weighted_per_user

# A weighted target that is no candidate: below PAD (-1, also a search hole), so never matched.
OUTSIDE_POOL = PAD - 1


@dataclass
class EvaluationRun:
    """What scoring reads: the checked setup, the users scored and the comparison rows' inputs."""

    setup: ScoringSetup
    rows: np.ndarray  # the holdout rows scored (all, or a sample of max_users)
    queries: np.ndarray  # the model's user vectors of every holdout row (user_vectors, memory-mapped)
    baseline: tuple[LoadedModel, PoolSearch, np.ndarray] | None  # the official-baseline preset, when trained
    truth: NextItemTruth | None  # the generator's ground truth (synthetic data only)
    popular: np.ndarray  # released pool positions, most popular first
    pool_item_ids: np.ndarray  # pool position -> item id (0: a row past the id table)
    exclude_history: bool  # items of a user's history are never recommended
    relevance: dict[int, float] | None  # relevance per action type for the weighted figures (10M), else None

    @property
    def methods(self) -> list[str]:
        return [name for name, method in SCORING_METHODS.items() if method.applies(self)]


@dataclass
class UserChunk:
    """One chunk of holdout users, as every scoring method sees it."""

    rows: np.ndarray  # holdout rows
    inputs: dict[str, np.ndarray]  # model inputs (``holdout_batch``)
    queries: np.ndarray  # the model's user vectors
    history: np.ndarray | None  # pool positions of the history items (None: history filter off)
    exclude_ids: np.ndarray | None  # the same as creative ids, for the index


def _model_top_k(run: EvaluationRun, chunk: UserChunk) -> np.ndarray:
    return run.setup.search.top_k(chunk.queries, chunk.exclude_ids)


def _model_extended_top_k(run: EvaluationRun, chunk: UserChunk) -> np.ndarray:
    return run.setup.search.top_k(chunk.queries, chunk.exclude_ids, extended=True)


def _popularity_top_k(run: EvaluationRun, chunk: UserChunk) -> np.ndarray:
    pool_pos = np.arange(len(run.setup.creative))
    return popularity_topk(run.popular, pool_pos, len(chunk.rows), K, exclude=chunk.history)


def _baseline_top_k(run: EvaluationRun, chunk: UserChunk) -> np.ndarray:
    assert run.baseline is not None
    _, b_search, b_queries = run.baseline
    return b_search.top_k(np.ascontiguousarray(b_queries[chunk.rows]), chunk.exclude_ids)


def _oracle_top_k(run: EvaluationRun, chunk: UserChunk) -> np.ndarray:
    assert run.truth is not None
    arrays = run.setup.arrays
    prev_rows = chunk.inputs["items"][:, -1]
    prev = np.where(prev_rows < int(arrays.meta["id_rows"]), prev_rows, 0)
    users = np.asarray(arrays.hold_users[chunk.rows]).astype(np.int64)  # the user's id, not its feature rows
    pool_pos = run.setup.released_positions
    return oracle_topk(run.truth, users, prev, run.pool_item_ids[pool_pos], K, pool_ids=pool_pos,
                       exclude=chunk.history)


def _always(run: EvaluationRun) -> bool:
    return True


@dataclass(frozen=True)
class ScoringMethod:
    """A row of the report: the top-K pool positions it recommends to a chunk of users."""

    top_k: Callable[[EvaluationRun, UserChunk], np.ndarray]
    applies: Callable[[EvaluationRun], bool] = _always
    timer: str = ""  # the phase of ``Evaluation.seconds`` its time counts in (default: the method's name)


# The report's rows, in order. Adding a method is one entry here.
EXTENDED = "model_extended"
SCORING_METHODS: dict[str, ScoringMethod] = {
    "model": ScoringMethod(_model_top_k, timer="search"),
    EXTENDED: ScoringMethod(_model_extended_top_k, applies=lambda run: run.setup.released is not None,
                            timer="search_extended"),
    "popularity": ScoringMethod(_popularity_top_k),
    "baseline": ScoringMethod(_baseline_top_k, applies=lambda run: run.baseline is not None),
    "oracle": ScoringMethod(_oracle_top_k, applies=lambda run: run.truth is not None),
}


@dataclass
class UserScores:
    """Per-method ranks of every scored user's target (and the weighted figures on 10M)."""

    ranks: dict[str, np.ndarray]
    weighted: dict[str, dict[str, np.ndarray]]  # method -> w_hr@10 / w_ndcg@10 per user (10M only)
    seconds: dict[str, float]


def weighted_targets(
    arrays: Arrays, rows: np.ndarray, position: np.ndarray, relevance: dict[int, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Padded target positions and their relevance weights for the weighted metrics. A target
    that is no candidate (a later click on an item outside the pool) is a miss that still
    weighs: its position is ``OUTSIDE_POOL``, never a list entry and not the padding."""
    targets = np.asarray(arrays.hold_targets[rows]).astype(np.int64)
    actions = np.asarray(arrays.hold_target_actions[rows]).astype(np.int64)
    pad = targets == 0
    target_pos = np.where(pad, PAD, np.where(position[targets] >= 0, position[targets], OUTSIDE_POOL))
    weights = relevance_weights(np.where(pad, PAD, actions), relevance)
    return target_pos, weights


def targets_outside_pool(run: EvaluationRun) -> np.ndarray:
    """Per scored user: its target is not in the released pool (a miss in every released row)."""
    target = run.setup.position[np.asarray(run.setup.arrays.hold_target[run.rows]).astype(np.int64)]
    if run.setup.released is None:
        return target < 0
    return (target < 0) | ~run.setup.released[np.maximum(target, 0)]


def _user_chunk(run: EvaluationRun, rows: np.ndarray) -> UserChunk:
    """The chunk's model inputs, its user vectors (read, not encoded) and its history filter."""
    setup = run.setup
    inputs = holdout_batch(setup.arrays, rows)
    queries = np.ascontiguousarray(run.queries[rows])
    history = setup.position[inputs["items"]] if run.exclude_history else None
    exclude_ids = as_ids(history, setup.creative) if history is not None else None
    return UserChunk(rows, inputs, queries, history, exclude_ids)


def _score_chunk(run: EvaluationRun, lo: int, rows: np.ndarray, scores: UserScores) -> None:
    """Every method's lists for one chunk of users (holdout ``rows``, from scored user ``lo``)."""
    setup, methods, relevance, timer = run.setup, run.methods, run.relevance, scores.seconds
    hi = lo + len(rows)
    t = time.perf_counter()
    chunk = _user_chunk(run, rows)
    timer["inputs"] += time.perf_counter() - t
    target = setup.position[np.asarray(setup.arrays.hold_target[rows]).astype(np.int64)]
    weighted = weighted_targets(setup.arrays, rows, setup.position, relevance) if relevance is not None else None
    for m in methods:
        t = time.perf_counter()
        top = SCORING_METHODS[m].top_k(run, chunk)
        timer[SCORING_METHODS[m].timer or m] += time.perf_counter() - t
        scores.ranks[m][lo:hi] = target_ranks(top, target)
        if weighted is not None:
            w_hr, w_nd = weighted_per_user(top, *weighted, K)
            scores.weighted[m]["w_hr@10"][lo:hi], scores.weighted[m]["w_ndcg@10"][lo:hi] = w_hr, w_nd


def score_users(run: EvaluationRun, logger: logging.Logger, started: float) -> UserScores:
    """Every method's top-10 for every scored user, chunk by chunk, ranked against the targets."""
    setup, n, methods = run.setup, len(run.rows), run.methods
    weighted = run.relevance is not None  # 10M: conversions weigh 2.5
    scores = UserScores(
        ranks={m: np.empty(n, np.int64) for m in methods},
        weighted={m: {"w_hr@10": np.empty(n), "w_ndcg@10": np.empty(n)} for m in methods} if weighted else {},
        seconds={"inputs": 0.0, **{SCORING_METHODS[m].timer or m: 0.0 for m in methods}},
    )
    logger.info(f"evaluating {n:,} holdout users against {len(setup.released_positions):,} released of "
                f"{len(setup.creative):,} candidates ({setup.search.describe()}, {setup.search.backend}), "
                f"methods {methods}, history filter {'on' if run.exclude_history else 'off'}")
    for lo in range(0, n, CHUNK_USERS):
        rows = run.rows[lo : lo + CHUNK_USERS]
        _score_chunk(run, lo, rows, scores)
        hi, done = lo + len(rows), time.perf_counter() - started
        logger.info(f"scored {hi:,}/{n:,} users ({hi / max(done, 1e-9):,.0f} users/s so far)")
    scores.seconds = {k: round(v, 3) for k, v in scores.seconds.items()}
    return scores


def headline(scores: UserScores) -> dict[str, dict[str, float]]:
    """The report's headline figures per method (weighted ones on 10M)."""
    weighted_means = {}
    for m, per_user in scores.weighted.items():
        whr, wnd = float(per_user["w_hr@10"].mean()), float(per_user["w_ndcg@10"].mean())
        weighted_means[m] = {"w_hr@10": whr, "w_ndcg@10": wnd, "w_score": float(score(whr, wnd))}
    return headline_figures(scores.ranks, K, weighted=weighted_means)


def slice_table(run: EvaluationRun, scores: UserScores) -> pd.DataFrame:
    """Figures per slice: history length, target popularity, cold vs warm target, target action."""
    arrays, position, rows = run.setup.arrays, run.setup.position, run.rows
    hold_items = np.asarray(arrays.hold_items[rows])
    target_rows = np.asarray(arrays.hold_target[rows]).astype(np.int64)
    target_popularity = np.asarray(arrays.item_counts)[target_rows].sum(axis=1)
    target_cold = np.asarray(arrays.cand_cold)[position[target_rows]] | (target_popularity == 0)
    slices = slice_frame(
        (hold_items != 0).sum(axis=1), target_popularity, target_cold,
        np.asarray(arrays.hold_target_action[rows]).astype(np.int64),
    )
    return slice_metrics(slices, scores.ranks, K, per_user=scores.weighted or None)


__all__ = [
    "EXTENDED",
    "OUTSIDE_POOL",
    "SCORING_METHODS",
    "EvaluationRun",
    "ScoringMethod",
    "UserChunk",
    "UserScores",
    "headline",
    "score_users",
    "slice_table",
    "targets_outside_pool",
    "weighted_targets",
]
