"""Reference rankings for the evaluation report: the popularity floor and the oracle ceiling.

* **Popularity**: every user gets the pool's most frequent items in the training sequences
  (optionally weighted by action type, e.g. clicks only), minus the user's history items
  when the evaluation excludes them. One global ranking, then a vectorized per-user filter.
* **Oracle** (synthetic data only): the generator's true next-item distribution
  (``GroundTruth.oracle_topk``: the user's interest mixture, the previous item's topic and
  each item's popularity), restricted to the candidate pool. It is the best any model can do
  in expectation, so the report shows the model's share of it.

Ids: ``pool_item_ids`` are the pool's item re-ids (the ``candidates.item_id`` column, 0 for a
candidate the indexer does not know), used to count and to ask the ground truth;
``pool_ids`` are what the functions return (creative ids for a submission, or the same re-ids).
Exclusions are given in the ``pool_ids`` space, like ``models.retrieval.search``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from models.data import Arrays
from models.errors import ModelError
from models.exclusions import Exclusions, as_csr, batch_exclusions, filter_topk

# Relevance of each action type for a click-weighted popularity (the 10M weights; exposures
# count 0, so only clicks and conversions rank items; ties fall back to the plain count).
CLICK_WEIGHTS: dict[int, float] = {0: 0.0, 1: 1.0, 2: 2.5}


class BaselineError(ModelError, ValueError):
    """Bad input to a baseline (empty pool, misaligned arrays)."""


class NextItemTruth(Protocol):
    """The generator's true next-item distribution (the synthetic source's ``GroundTruth``),
    indexed by item re-ids (row 0 = padding)."""

    @property
    def num_items(self) -> int: ...

    item_topic: np.ndarray  # int64[N + 1]: each item's topic
    item_popularity: np.ndarray  # float64[N + 1]: P(item | its topic)

    def oracle_topk(self, user_ids: np.ndarray, prev_item_ids: np.ndarray, candidate_item_ids: np.ndarray,
                    k: int = ...) -> np.ndarray: ...


def _pool(pool_item_ids: np.ndarray, pool_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    items = np.asarray(pool_item_ids, dtype=np.int64)
    if items.ndim != 1 or not len(items):
        raise BaselineError("the candidate pool is empty")
    out = items if pool_ids is None else np.asarray(pool_ids, dtype=np.int64)
    if out.shape != items.shape:
        raise BaselineError(f"pool_ids has {len(out)} entries, pool_item_ids {len(items)}")
    return items, out


def _pool_rows(pool_ids: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Vectorized id -> pool row (-1 when absent)."""
    order = np.argsort(pool_ids, kind="stable")
    sorted_ids = pool_ids[order]

    def rows_of(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        return np.where(sorted_ids[pos] == ids, order[pos], -1)

    return rows_of


def _topk_with_exclusions(
    ranked_rows: Callable[[int, int, int], np.ndarray],
    num_users: int,
    k: int,
    exclude: Exclusions | None,
    pool_ids: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """Shared by both baselines: ``ranked_rows(lo, hi, fetch)`` gives each user's best
    ``fetch`` pool rows (best first); keep the first ``k`` not excluded. Returns rows [users, k]
    (-1 where the pool runs out)."""
    n = len(pool_ids)
    out = np.full((num_users, k), -1, dtype=np.int64)
    exclusions = (as_csr(exclude, num_users), _pool_rows(pool_ids)) if exclude is not None else None
    for lo in range(0, num_users, batch_size):
        hi = min(num_users, lo + batch_size)
        keys, extra = batch_exclusions(exclusions[0], lo, hi, exclusions[1], n) if exclusions is not None else (None, 0)
        fetch = min(n, k + extra)
        labels = ranked_rows(lo, hi, fetch)
        dummy = np.zeros(labels.shape, dtype=np.float32)
        out[lo:hi] = filter_topk(labels, dummy, keys, n, k)[0]
    return out


# --- Popularity --------------------------------------------------------------------------
def popularity_ranking(
    seq_item_ids: np.ndarray,
    pool_item_ids: np.ndarray,
    seq_action_types: np.ndarray | None = None,
    *,
    action_weights: Mapping[int, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pool rows, most popular first, and each row's popularity score.

    ``seq_item_ids`` (and aligned ``seq_action_types``): every event of the training
    sequences, flattened. Score = number of events (``action_weights=None``) or the sum of
    ``action_weights[action type]`` (e.g. ``CLICK_WEIGHTS``); ties go to the plain count, then
    to the pool order. Items never seen (cold) score 0 and come last.
    """
    items = np.asarray(pool_item_ids, dtype=np.int64)
    if items.ndim != 1 or not len(items):
        raise BaselineError("the candidate pool is empty")
    seq = np.asarray(seq_item_ids, dtype=np.int64).ravel()
    size = int(max(seq.max(initial=0), items.max(initial=0))) + 1
    if seq.size and seq.min() < 0:
        raise BaselineError("sequence item ids must be >= 0 (0 = padding)")
    counts = np.bincount(seq, minlength=size).astype(np.float64)
    weighted: np.ndarray = counts
    if action_weights is not None:
        if seq_action_types is None:
            raise BaselineError("action_weights needs seq_action_types (aligned with seq_item_ids)")
        actions = np.asarray(seq_action_types, dtype=np.int64).ravel()
        if actions.shape != seq.shape:
            raise BaselineError(f"{len(actions)} action types for {len(seq)} sequence items")
        table = np.zeros(int(max(actions.max(initial=0), max(action_weights, default=0))) + 1)
        for action, weight in action_weights.items():
            table[int(action)] = float(weight)
        weighted = np.bincount(seq, weights=table[np.maximum(actions, 0)], minlength=size)
    counts[0] = weighted[0] = 0.0  # padding / unknown item
    safe = np.clip(items, 0, size - 1)
    score = np.where(items > 0, weighted[safe], 0.0)
    plain = np.where(items > 0, counts[safe], 0.0)
    order = np.lexsort((np.arange(len(items)), -plain, -score))
    return order, score[order]


def popularity_order(arrays: Arrays, actions: tuple[int, ...]) -> np.ndarray:
    """Pool positions of prepared ``arrays`` (models.data) by training popularity for the
    target ``actions`` (ties: all events, then pool order); cold items (never seen) last."""
    counts = np.asarray(arrays.item_counts)[np.asarray(arrays.cand_rows).astype(np.int64)]
    target = counts[:, list(actions)].sum(axis=1)
    plain = counts.sum(axis=1)
    return np.lexsort((np.arange(len(counts)), -plain, -target))


def popularity_topk(
    ranking: np.ndarray,
    pool_ids: np.ndarray,
    num_users: int,
    k: int = 10,
    *,
    exclude: Exclusions | None = None,
    batch_size: int = 65_536,
) -> np.ndarray:
    """[num_users, k] ids from ``pool_ids``: the global popularity ``ranking`` (pool rows,
    from ``popularity_ranking``) minus each user's excluded ids. Without exclusions every
    row is the same list."""
    pool_ids = np.asarray(pool_ids, dtype=np.int64)
    ranking = np.asarray(ranking, dtype=np.int64)
    if not len(pool_ids):
        raise BaselineError("the candidate pool is empty")
    if exclude is None:
        top = ranking[:k]
        row = np.full(k, -1, dtype=np.int64)
        row[: len(top)] = pool_ids[top]
        return np.broadcast_to(row, (num_users, k)).copy()

    def ranked_rows(lo: int, hi: int, fetch: int) -> np.ndarray:
        return np.broadcast_to(ranking[:fetch], (hi - lo, min(fetch, len(ranking))))

    rows = _topk_with_exclusions(ranked_rows, num_users, k, exclude, pool_ids, batch_size)
    return np.where(rows >= 0, pool_ids[np.maximum(rows, 0)], -1)


# --- Oracle ------------------------------------------------------------------------------
def oracle_candidates(truth: NextItemTruth, pool_item_ids: np.ndarray, depth: int) -> np.ndarray:
    """Pool rows that can appear in any user's oracle top-``depth``: the ``depth`` most
    popular pool items of each topic. Exact because the oracle score of an item is
    (user's weight of its topic) x (its popularity in the topic): within a topic every user
    ranks items the same way. Shrinks the pool from N items to topics x depth."""
    items = np.asarray(pool_item_ids, dtype=np.int64)
    valid = (items >= 1) & (items <= truth.num_items)
    rows = np.flatnonzero(valid)
    topic = truth.item_topic[items[rows]]
    popularity = truth.item_popularity[items[rows]]
    order = np.lexsort((rows, -popularity, topic))
    topic_sorted = topic[order]
    rank_in_topic = np.arange(len(order)) - np.searchsorted(topic_sorted, topic_sorted)
    return np.sort(rows[order[rank_in_topic < depth]])


def oracle_topk(
    truth: NextItemTruth,
    user_ids: np.ndarray,
    prev_item_ids: np.ndarray,
    pool_item_ids: np.ndarray,
    k: int = 10,
    *,
    pool_ids: np.ndarray | None = None,
    exclude: Exclusions | None = None,
    batch_size: int = 65_536,
) -> np.ndarray:
    """[users, k] ids (``pool_ids``, default the item re-ids) by true next-click probability.

    ``truth``: the generator's ground truth (``GroundTruth``). ``user_ids`` are user re-ids;
    ``prev_item_ids`` each user's last history item before the target (0 when the history is
    empty). Cold items and items the generator does not know have probability 0. The same
    exclusions as the model's are applied, so the ceiling is measured under the same rules.
    """
    items, out_ids = _pool(pool_item_ids, pool_ids)
    users = np.asarray(user_ids, dtype=np.int64)
    prev = np.asarray(prev_item_ids, dtype=np.int64)
    if users.shape != prev.shape or users.ndim != 1:
        raise BaselineError("user_ids and prev_item_ids must be 1-d arrays of the same length")
    num_users = len(users)
    max_exclusions = 0
    if exclude is not None:
        csr = as_csr(exclude, num_users)
        max_exclusions = int(np.diff(csr.offsets).max(initial=0))
        exclude = csr
    candidates = oracle_candidates(truth, items, k + max_exclusions)
    if len(candidates) < k + max_exclusions:  # too few warm items: add the rest of the pool
        rest = np.setdiff1d(np.arange(len(items)), candidates)
        candidates = np.concatenate([candidates, rest[: k + max_exclusions - len(candidates)]])
    cand_items = items[candidates]
    # The ground truth returns item ids; map them back to positions in `candidates`.
    lookup_order = np.argsort(cand_items, kind="stable")
    lookup_sorted = cand_items[lookup_order]

    def ranked_rows(lo: int, hi: int, fetch: int) -> np.ndarray:
        fetch = min(fetch, len(candidates))
        top_items = truth.oracle_topk(users[lo:hi], prev[lo:hi], cand_items, fetch)
        pos = np.minimum(np.searchsorted(lookup_sorted, top_items), len(lookup_sorted) - 1)
        return candidates[lookup_order[pos]]

    rows = _topk_with_exclusions(ranked_rows, num_users, k, exclude, out_ids, batch_size)
    return np.where(rows >= 0, out_ids[np.maximum(rows, 0)], -1)


__all__ = [
    "CLICK_WEIGHTS",
    "BaselineError",
    "NextItemTruth",
    "oracle_candidates",
    "oracle_topk",
    "popularity_ranking",
    "popularity_topk",
]
