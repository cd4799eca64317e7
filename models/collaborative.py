"""Collaborative item vectors: what the training sequences say about items, as dense vectors.

Semantic IDs quantize item vectors. A real dataset may have no multi-modal family, or one that
covers a sliver of the catalogue (the demo sample: 66 of 7,500 items); the sequences always
exist. Items that appear near each other in users' histories are related, so:

    C[i, j]   = sum over sequences of 1/d for every pair (i, j) at distance d <= window (i != j)
    PPMI[i,j] = max(0, log(C[i,j] * D / (C[i,.] * Pc[j])))   D = sum C, Pc = C[.,j]^0.75 normalized
    V         = U_k * sqrt(S_k)          truncated SVD of PPMI (randomized, seeded), rows L2-normalized

(Levy, Goldberg & Dagan 2015: PPMI with context smoothing 0.75, eigenvalue weighting 0.5.)
Items that co-occur get close vectors; items of unrelated sequences get near-orthogonal ones.

Bounded at scale: the matrix covers the ``max_items`` most frequent items only (ties by id),
built from sequences streamed in batches with vectorized numpy and scipy.sparse (no per-user
Python loop). A rarer item that occurs in a sequence gets the normalized mean of the vectors of
the frequent items within the window around its occurrences (a "fold-in", one more streaming
pass). An item with no frequent neighbour, or never in a sequence, gets no vector; callers fall
back as they do for items without a content embedding.

Nothing here reads a file or imports Dagster: the caller passes a function that yields the
sequences as (flat item ids, lengths) batches, so the same code runs on a DuckDB table or on
arrays in a test.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

# Yields (item ids of several sequences concatenated, length of each sequence); called once
# per pass (three passes).
SequenceBatches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]

_OVERSAMPLE = 10  # extra random directions of the randomized SVD
_ZERO_NORM = 1e-6  # a vector shorter than this share of the longest one carries no signal


@dataclass
class CollaborativeConfig:
    dim: int = 32
    window: int = 3  # pairs of items at most this many positions apart, weighted 1/distance
    max_items: int = 100_000  # the most frequent items get SVD vectors; rarer ones a fold-in
    smoothing: float = 0.75  # context distribution smoothing of the PMI
    power_iterations: int = 2  # of the randomized SVD (4 gave the same top 32 singular values at 200K users)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1 or self.window < 1 or self.max_items < 2 or self.power_iterations < 0:
            raise ValueError(f"dim, window >= 1, max_items >= 2, power_iterations >= 0 expected: {self}")


@dataclass
class CollaborativeVectors:
    item_ids: np.ndarray  # int64 [n], sorted
    vectors: np.ndarray  # float32 [n, dim], unit rows
    stats: dict[str, Any] = field(default_factory=dict)


def item_counts(batches: SequenceBatches) -> np.ndarray:
    """Occurrences of each item id (index = id) over all sequences."""
    counts = np.zeros(0, np.int64)
    for values, _ in batches():
        values = np.asarray(values, np.int64)
        values = values[values > 0]
        if len(values) == 0:
            continue
        batch = np.bincount(values)
        if len(batch) > len(counts):
            counts = np.concatenate([counts, np.zeros(len(batch) - len(counts), np.int64)])
        counts[: len(batch)] += batch
    return counts


def frequent_items(counts: np.ndarray, max_items: int) -> np.ndarray:
    """The (at most) ``max_items`` most frequent item ids, most frequent first, ties by id."""
    seen = np.flatnonzero(counts > 0)
    order = np.lexsort((seen, -counts[seen]))
    return seen[order[:max_items]]


def window_positions(lengths: np.ndarray, window: int) -> Iterable[tuple[np.ndarray, np.ndarray, float]]:
    """(left, right, 1/d) for every d in 1..window: the positions d apart within the same
    sequence of the concatenation of sequences of ``lengths``."""
    lengths = np.asarray(lengths, np.int64)
    sequence = np.repeat(np.arange(len(lengths)), lengths)
    for distance in range(1, window + 1):
        left = np.flatnonzero(sequence[:-distance] == sequence[distance:])
        yield left, left + distance, 1.0 / distance


def _lookup_table(ids: np.ndarray, size: int) -> np.ndarray:
    """int32 [size]: the position of each id in ``ids``, -1 elsewhere."""
    table = np.full(size, -1, np.int32)
    table[ids] = np.arange(len(ids), dtype=np.int32)
    return table


def _mapped(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.int64)
    inside = (values > 0) & (values < len(table))
    out = np.full(len(values), -1, np.int32)
    out[inside] = table[values[inside]]
    return out


class _SparseSum:
    """A sum of sparse matrices added one at a time. Partial sums of similar size are merged
    (a binary counter), so an entry is copied O(log batches) times, not once per batch."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.parts: list[sp.csr_matrix] = []

    def add(self, matrix: sp.csr_matrix) -> None:
        self.parts.append(matrix)
        while len(self.parts) > 1 and self.parts[-2].nnz <= 2 * self.parts[-1].nnz:
            top = self.parts.pop()
            self.parts[-1] = self.parts[-1] + top

    def total(self) -> sp.csr_matrix:
        out = sp.csr_matrix(self.shape, dtype=np.float32)
        for part in self.parts:
            out = out + part
        return out


def cooccurrence(batches: SequenceBatches, index_of: np.ndarray, n: int, window: int) -> sp.csr_matrix:
    """Symmetric [n, n] float32 counts, weighted 1/distance, of the indexed items (no diagonal).

    Accumulated as the upper triangle (half the memory) and mirrored at the end."""
    upper = _SparseSum((n, n))
    for values, lengths in batches():
        rows = _mapped(values, index_of)
        lows, highs, weights = [], [], []
        for left, right, weight in window_positions(lengths, window):
            left, right = rows[left], rows[right]
            keep = (left >= 0) & (right >= 0) & (left != right)
            left, right = left[keep], right[keep]
            lows.append(np.minimum(left, right))
            highs.append(np.maximum(left, right))
            weights.append(np.full(len(left), weight, np.float32))
        if lows:
            batch = (np.concatenate(weights), (np.concatenate(lows), np.concatenate(highs)))
            upper.add(sp.coo_matrix(batch, shape=(n, n)).tocsr())  # tocsr sums the duplicates
    total = upper.total()
    return (total + total.T).tocsr()


def ppmi(counts: sp.csr_matrix, smoothing: float) -> sp.csr_matrix:
    """Positive PMI of a co-occurrence matrix, the context marginal raised to ``smoothing``
    (float32, computed in place on a copy of the counts' values)."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    marginal = np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()
    if marginal.sum() <= 0:
        return sp.csr_matrix(counts.shape, dtype=np.float32)
    context = marginal**smoothing
    context /= context.sum()
    with np.errstate(divide="ignore"):  # items without any pair: no entry reads them
        log_marginal, log_context = np.log(marginal).astype(np.float32), np.log(context).astype(np.float32)
    rows = np.repeat(np.arange(counts.shape[0], dtype=np.int32), np.diff(counts.indptr))
    # log(P(i, j) / (P(i) Pc(j))) with P(i, j) = C[i, j] / total and P(i) = marginal[i] / total.
    pmi = np.log(counts.data)
    pmi -= log_marginal[rows]
    del rows
    pmi -= log_context[counts.indices]
    np.maximum(pmi, 0.0, out=pmi)
    out = sp.csr_matrix((pmi, counts.indices, counts.indptr), shape=counts.shape)
    out.eliminate_zeros()
    return out


def truncated_svd(matrix: sp.csr_matrix, k: int, *, power_iterations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(U [n, k], S [k]) of the k largest singular values: randomized range finder with power
    iterations (Halko, Martinsson & Tropp 2011), deterministic by ``seed``; exact for small n.

    One BLAS thread: the dense steps (QR of [n, k + 10]) are small next to the sparse products
    (single-threaded in scipy), and on a busy machine a second OpenBLAS thread made them 10x
    slower (measured: 0.5 s vs 0.05 s for five QRs of 6,749 x 42 at load 1.5 on 2 cores)."""
    with threadpool_limits(1, user_api="blas"):
        return _truncated_svd(matrix, k, power_iterations, seed)


def _truncated_svd(matrix: sp.csr_matrix, k: int, power_iterations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = matrix.shape[0]
    k = min(k, n)
    if n <= 4 * (k + _OVERSAMPLE):
        u, s, _ = np.linalg.svd(matrix.toarray().astype(np.float64), full_matrices=False)
        return u[:, :k], s[:k]
    # float32 throughout: the sparse products dominate and are memory bound. matrix.T is a
    # CSC view of the same arrays (no copy).
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    basis = np.linalg.qr(matrix @ rng.standard_normal((n, k + _OVERSAMPLE), dtype=np.float32))[0]
    for _ in range(power_iterations):
        basis = np.linalg.qr(matrix.T @ basis)[0]
        basis = np.linalg.qr(matrix @ basis)[0]
    small = (matrix.T @ basis).T.astype(np.float64)  # basis^T A: [k + oversample, n]
    u_small, s, _ = np.linalg.svd(small, full_matrices=False)
    return basis @ u_small[:, :k].astype(np.float32), s[:k]


def _unit_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalized float32 rows, mask of the rows long enough to carry a direction)."""
    norms = np.linalg.norm(vectors, axis=1)
    keep = norms > _ZERO_NORM * max(float(norms.max(initial=0.0)), 1e-30)
    out = np.zeros(vectors.shape, np.float32)
    out[keep] = vectors[keep] / norms[keep, None]
    return out, keep


def fold_in(
    batches: SequenceBatches, index_of: np.ndarray, rare_of: np.ndarray, n_rare: int, vectors: np.ndarray, window: int
) -> np.ndarray:
    """float32 [n_rare, dim]: per rare item, the 1/distance-weighted sum of the vectors of the
    frequent items within ``window`` positions of its occurrences."""
    sums = np.zeros((n_rare, vectors.shape[1]), np.float32)
    for values, lengths in batches():
        frequent, rare = _mapped(values, index_of), _mapped(values, rare_of)
        owners, neighbours, weights = [], [], []
        for left, right, weight in window_positions(lengths, window):
            for owner, neighbour in ((rare[left], frequent[right]), (rare[right], frequent[left])):
                keep = (owner >= 0) & (neighbour >= 0)
                owners.append(owner[keep])
                neighbours.append(neighbour[keep])
                weights.append(np.full(int(keep.sum()), weight, np.float32))
        owner = np.concatenate(owners) if owners else np.zeros(0, np.int32)
        if len(owner) == 0:
            continue
        touched, local = np.unique(owner, return_inverse=True)
        pairs = sp.csr_matrix(
            (np.concatenate(weights), (local, np.concatenate(neighbours))), shape=(len(touched), len(vectors))
        )
        sums[touched] += pairs @ vectors
    return sums


def collaborative_vectors(batches: SequenceBatches, cfg: CollaborativeConfig | None = None) -> CollaborativeVectors:
    """Unit item vectors from the sequences (module docstring): SVD of the PPMI of the frequent
    items' co-occurrence, folded in for rarer items. Items without a vector are left out."""
    cfg = cfg or CollaborativeConfig()
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    counts = item_counts(batches)
    frequent = np.sort(frequent_items(counts, cfg.max_items))
    index_of = _lookup_table(frequent, len(counts))
    seconds["count"] = time.perf_counter() - started

    started = time.perf_counter()
    matrix = ppmi(cooccurrence(batches, index_of, len(frequent), cfg.window), cfg.smoothing)
    seconds["cooccurrence"] = time.perf_counter() - started
    started = time.perf_counter()
    dim = max(1, min(cfg.dim, len(frequent) - 1))
    if matrix.nnz:
        u, s = truncated_svd(matrix, dim, power_iterations=cfg.power_iterations, seed=cfg.seed)
        frequent_vectors, has_vector = _unit_rows(u * np.sqrt(s))
    else:
        frequent_vectors, has_vector = np.zeros((len(frequent), dim), np.float32), np.zeros(len(frequent), bool)
    seconds["svd"] = time.perf_counter() - started

    started = time.perf_counter()
    rare = np.flatnonzero(counts > 0)
    rare = rare[index_of[rare] < 0]
    rare_vectors, rare_has = np.zeros((0, dim), np.float32), np.zeros(0, bool)
    if len(rare) and has_vector.any():
        sums = fold_in(batches, index_of, _lookup_table(rare, len(counts)), len(rare), frequent_vectors, cfg.window)
        rare_vectors, rare_has = _unit_rows(sums)
    seconds["fold_in"] = time.perf_counter() - started

    ids = np.concatenate([frequent[has_vector], rare[rare_has]])
    vectors = np.concatenate([frequent_vectors[has_vector], rare_vectors[rare_has]])
    order = np.argsort(ids, kind="stable")
    stats = {
        "items_in_sequences": int((counts > 0).sum()),
        "frequent_items": int(len(frequent)),
        "frequent_with_vector": int(has_vector.sum()),
        "folded_in": int(rare_has.sum()),
        "without_vector": int((counts > 0).sum() - len(ids)),
        "cooccurrence_nonzeros": int(matrix.nnz),
        "dim": int(dim),
        "window": cfg.window,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    return CollaborativeVectors(ids[order].astype(np.int64), np.ascontiguousarray(vectors[order]), stats)
