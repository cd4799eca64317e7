"""How good a set of Semantic IDs is: codebook usage, reconstruction error per level, and, where
true topics are known (the synthetic generator's), how well the level-1 codes recover them
against chance (normalized mutual information, purity)."""

from __future__ import annotations

import numpy as np

from models.semantic_ids import Encoded


def reconstruction_error(encoded: Encoded) -> list[float]:
    """Per level: sum |x' - x_hat|^2 / sum |x'|^2 using the first l levels (decreasing)."""
    total = float(encoded.sq_norm.sum(dtype=np.float64)) or 1.0
    return [float(encoded.level_sq_error[:, level].sum(dtype=np.float64)) / total for level in range(encoded.codes.shape[1])]


def utilization(codes: np.ndarray, codebook_size: int) -> list[float]:
    """Per level: the share of the K codes used by at least one item (unknown code excluded)."""
    codes = np.asarray(codes)
    return [
        float(np.unique(codes[:, level][codes[:, level] < codebook_size]).size) / codebook_size
        for level in range(codes.shape[1])
    ]


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalized mutual information (arithmetic normalization, as sklearn's default)."""
    a = np.unique(np.asarray(a), return_inverse=True)[1].reshape(-1)
    b = np.unique(np.asarray(b), return_inverse=True)[1].reshape(-1)
    n = len(a)
    if n == 0:
        return 0.0
    joint = np.zeros((a.max() + 1, b.max() + 1), np.float64)
    np.add.at(joint, (a, b), 1.0)
    joint /= n
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mutual = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha = float(-(pa[pa > 0] * np.log(pa[pa > 0])).sum())
    hb = float(-(pb[pb > 0] * np.log(pb[pb > 0])).sum())
    if ha == 0.0 and hb == 0.0:
        return 1.0
    return max(0.0, 2.0 * mutual / (ha + hb))


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Share of items whose label is the majority label of their cluster."""
    clusters = np.unique(np.asarray(clusters), return_inverse=True)[1].reshape(-1)
    labels = np.unique(np.asarray(labels), return_inverse=True)[1].reshape(-1)
    if len(clusters) == 0:
        return 0.0
    joint = np.zeros((clusters.max() + 1, labels.max() + 1), np.int64)
    np.add.at(joint, (clusters, labels), 1)
    return float(joint.max(axis=1).sum()) / len(clusters)


def topic_recovery(level1: np.ndarray, topics: np.ndarray, seed: int = 0) -> dict[str, float]:
    """How well level-1 codes recover known topics; ``*_chance`` is the same with the codes
    shuffled across items (what an unrelated partition of the same sizes scores)."""
    shuffled = np.random.default_rng(seed).permutation(np.asarray(level1))
    return {
        "nmi": round(nmi(level1, topics), 4),
        "purity": round(purity(level1, topics), 4),
        "nmi_chance": round(nmi(shuffled, topics), 4),
        "purity_chance": round(purity(shuffled, topics), 4),
        "items": int(len(topics)),
        "topics": int(np.unique(topics).size),
    }
