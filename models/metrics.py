"""Official retrieval metrics for single targets (pure numpy, vectorized).

    HR@10   = 1 if the target is among the top 10, averaged over users
    NDCG@10 = 1 / log2(rank + 2) for a hit at 0-based rank, else 0, averaged over users
    Score   = 0.31 * HR@10 + 0.69 * NDCG@10
"""

from __future__ import annotations

import numpy as np

K = 10
HR_WEIGHT, NDCG_WEIGHT = 0.31, 0.69


def target_ranks(topk: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each user's target in its top-k list ([users, k] ids), -1 if absent."""
    topk = np.asarray(topk)
    hits = topk == np.asarray(targets)[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), -1)


def hits_from_ranks(ranks: np.ndarray, k: int = K) -> np.ndarray:
    """Per-user HR@k (0.0 / 1.0)."""
    ranks = np.asarray(ranks)
    return ((ranks >= 0) & (ranks < k)).astype(np.float64)


def ndcg_from_ranks(ranks: np.ndarray, k: int = K) -> np.ndarray:
    """Per-user NDCG@k of a single target: 1 / log2(rank + 2) for a hit, else 0."""
    ranks = np.asarray(ranks)
    hit = (ranks >= 0) & (ranks < k)
    return np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)


def hit_rate(ranks: np.ndarray, k: int = K) -> float:
    ranks = np.asarray(ranks)
    return float(hits_from_ranks(ranks, k).mean()) if len(ranks) else 0.0


def ndcg(ranks: np.ndarray, k: int = K) -> float:
    ranks = np.asarray(ranks)
    return float(ndcg_from_ranks(ranks, k).mean()) if len(ranks) else 0.0


def score(hr: float | np.ndarray, ndcg_value: float | np.ndarray) -> float | np.ndarray:
    """The official combination: 0.31 * HR@10 + 0.69 * NDCG@10."""
    return HR_WEIGHT * hr + NDCG_WEIGHT * ndcg_value


def retrieval_metrics(topk: np.ndarray, targets: np.ndarray, k: int = K) -> dict[str, float]:
    """HR@k, NDCG@k and the official score of top-k lists against single targets."""
    ranks = target_ranks(np.asarray(topk)[:, :k], targets)
    hr, nd = hit_rate(ranks, k), ndcg(ranks, k)
    return {f"hr@{k}": hr, f"ndcg@{k}": nd, "score": float(score(hr, nd))}
