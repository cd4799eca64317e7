"""Ranking metrics from ranks and the weighted 10M metrics (pure numpy, vectorized over users).

Single target (both tracks). ``rank`` is 0-based, -1 = not in the list:

    HR@10   = 1 if 0 <= rank < 10                      (per user; the report averages)
    NDCG@10 = 1 / log2(rank + 2) for a hit, else 0     (rank 0 -> 1, rank 9 -> 1/log2(11))
    Score   = 0.31 * HR@10 + 0.69 * NDCG@10

Weighted (10M): each user has several targets (``holdout.target_item_ids`` with their action
types), relevance w = 0 exposure, 1 click, 2.5 conversion:

    w-HR@10   = sum of w over targets in the top 10 / sum of w over all the user's targets
    w-DCG@10  = sum over list positions i (0-based) holding a target t of w_t / log2(i + 2)
    w-IDCG@10 = the same for the ideal list: targets by w descending, the first min(10, |T|)
    w-NDCG@10 = w-DCG@10 / w-IDCG@10,   w-Score = 0.31 * w-HR@10 + 0.69 * w-NDCG@10

A target counts once, at its first position (a list with a repeated id does not score twice).
A user whose targets weigh 0 in total scores 0 (the holdout never produces one: its targets
are clicks or conversions). Targets are padded to a rectangle with ``pad`` (default -1, never
a real id); padded slots weigh nothing.

The single-target formulas live in ``models/metrics.py`` (same rank convention: 0-based, -1
miss); this module adds the weighted ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from models.metrics import HR_WEIGHT, NDCG_WEIGHT, K, hits_from_ranks, ndcg_from_ranks, score
from models.metrics import target_ranks as ranks_of_targets

# The 10M track's relevance per action type (exposure, click, conversion), the default weights;
# the pipeline passes its track's own (taac_dagster/tracks.py).
RELEVANCE: dict[int, float] = {0: 0.0, 1: 1.0, 2: 2.5}
PAD = -1
_CHUNK_CELLS = 1 << 24  # users per chunk = this / (k * targets)


# --- Single target, from ranks (formulas in models/metrics.py) ----------------------------
def metrics_from_ranks(ranks: np.ndarray, k: int = K) -> dict[str, float]:
    """Mean HR@k, NDCG@k and Score over users (0 for no users)."""
    ranks = np.asarray(ranks)
    if not ranks.size:
        return {f"hr@{k}": 0.0, f"ndcg@{k}": 0.0, "score": 0.0, "users": 0}
    hr = float(hits_from_ranks(ranks, k).mean())
    nd = float(ndcg_from_ranks(ranks, k).mean())
    return {f"hr@{k}": hr, f"ndcg@{k}": nd, "score": float(score(hr, nd)), "users": int(ranks.size)}


# --- Weighted, many targets --------------------------------------------------------------
def relevance_weights(
    action_types: np.ndarray, relevance: Mapping[int, float] | None = None, *, pad: int = PAD
) -> np.ndarray:
    """Weights for an (optionally padded) array of action types; ``pad`` slots weigh 0."""
    relevance = RELEVANCE if relevance is None else relevance
    actions = np.asarray(action_types, dtype=np.int64)
    table = np.zeros(max(max(relevance) + 1, int(actions.max(initial=0)) + 1))
    for action, weight in relevance.items():
        table[action] = weight
    valid = (actions != pad) & (actions >= 0)
    return np.where(valid, table[np.where(valid, actions, 0)], 0.0)


def pad_targets(lists: Sequence[Sequence[int]], *, pad: int = PAD, width: int | None = None) -> np.ndarray:
    """Ragged per-user lists (target ids or action types) -> a padded int64 [users, width]."""
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    width = int(lengths.max(initial=0)) if width is None else width
    out = np.full((len(lists), width), pad, dtype=np.int64)
    if len(lists) and width:
        values = np.concatenate([np.asarray(x, dtype=np.int64)[:width] for x in lists])
        lengths = np.minimum(lengths, width)
        rows = np.repeat(np.arange(len(lists)), lengths)
        cols = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[rows, cols] = values
    return out


def ideal_dcg(weights: np.ndarray, k: int = K) -> np.ndarray:
    """Per-user w-IDCG@k: weights sorted descending, the first min(k, |targets|) discounted."""
    w = -np.sort(-np.asarray(weights, dtype=np.float64), axis=1)[:, :k]
    discounts = 1.0 / np.log2(np.arange(w.shape[1]) + 2.0)
    return w @ discounts


def weighted_per_user(
    topk: np.ndarray,
    target_ids: np.ndarray,
    target_weights: np.ndarray,
    k: int = K,
    *,
    pad: int = PAD,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-user (w-HR@k, w-NDCG@k) for lists ``topk`` [users, >=k] against padded targets
    ``target_ids`` [users, T] with weights ``target_weights`` [users, T]."""
    topk = np.asarray(topk)[:, :k]
    targets = np.asarray(target_ids)
    weights = np.asarray(target_weights, dtype=np.float64)
    if targets.shape != weights.shape or targets.ndim != 2 or len(targets) != len(topk):
        raise ValueError(
            f"target ids {targets.shape}, weights {weights.shape} and lists {topk.shape} must share the users axis"
        )
    weights = np.where(targets == pad, 0.0, weights)
    users, width = targets.shape
    hr = np.zeros(users)
    ndcg = np.zeros(users)
    discounts = 1.0 / np.log2(np.arange(k) + 2.0)
    step = max(1, _CHUNK_CELLS // max(1, k * max(1, width)))
    for lo in range(0, users, step):
        hi = min(users, lo + step)
        t, w = targets[lo:hi], weights[lo:hi]
        match = (topk[lo:hi, :, None] == t[:, None, :]) & (t[:, None, :] != pad)  # [u, k, T]
        found = match.any(axis=1)  # [u, T]
        first = match.argmax(axis=1)  # first position of each target
        total = w.sum(axis=1)
        gain = np.where(found, w, 0.0)
        dcg = (gain * discounts[first]).sum(axis=1)
        idcg = ideal_dcg(w, k)
        ok = total > 0
        hr[lo:hi] = np.where(ok, gain.sum(axis=1) / np.where(ok, total, 1.0), 0.0)
        ndcg[lo:hi] = np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0)
    return hr, ndcg


def weighted_metrics(
    topk: np.ndarray,
    target_ids: np.ndarray,
    target_action_types: np.ndarray,
    k: int = K,
    *,
    relevance: Mapping[int, float] | None = None,
    pad: int = PAD,
) -> dict[str, float]:
    """Mean w-HR@k, w-NDCG@k and w-Score over users, from padded target ids / action types."""
    weights = relevance_weights(target_action_types, relevance, pad=pad)
    hr, nd = weighted_per_user(topk, target_ids, weights, k, pad=pad)
    if not len(hr):
        return {f"w_hr@{k}": 0.0, f"w_ndcg@{k}": 0.0, "w_score": 0.0, "users": 0}
    whr, wnd = float(hr.mean()), float(nd.mean())
    return {f"w_hr@{k}": whr, f"w_ndcg@{k}": wnd, "w_score": float(score(whr, wnd)), "users": int(len(hr))}


__all__ = [
    "HR_WEIGHT",
    "K",
    "NDCG_WEIGHT",
    "PAD",
    "RELEVANCE",
    "hits_from_ranks",
    "ideal_dcg",
    "metrics_from_ranks",
    "ndcg_from_ranks",
    "pad_targets",
    "ranks_of_targets",
    "relevance_weights",
    "score",
    "weighted_metrics",
    "weighted_per_user",
]
