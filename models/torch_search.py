"""Exact top-k over the candidate pool on a torch device (a GPU), with per-query exclusions.

    index = TorchExactIndex(item_vectors, device="cuda")   # [n, d], uploaded once
    rows, scores = index.search(queries, 10, exclude=(offsets, rows), allowed=mask)

* **The pool is uploaded once**: the item matrix lives on the device for the index's lifetime
  (one evaluation, one submission), each ``search`` call only uploads its queries and their
  exclusions, once per call, and copies the [nq, k] result back once.
* **Bounded memory**: queries are scored in blocks of ``block_rows`` (one matmul each), chosen
  so that a block's [block, n] float32 score matrix stays under ``max_score_bytes`` (2 GiB by
  default: 813 queries a block at the 1M track's 660K pool, 147 at the 10M track's 3.6M), so
  memory is flat whatever the number of queries.
* **Exclusions are masked, not over-fetched**: a query's excluded rows (its history) and every
  row outside ``allowed`` get -inf before ``torch.topk``. A slot that cannot be filled (fewer
  allowed, non-excluded rows than k) holds row -1 and score -inf, as ``models.retrieval.search``.
* Scores are exact float32 inner products (TF32 is switched off for the search), cosines when
  ``normalize`` (query and item rows L2-normalized, as the Faiss indexes do).

Only numpy and torch are needed: benchmarks/bench_retrieval.py ``--torch-only`` times it on a
machine without the pipeline. ``models.retrieval.torch_exact_search`` wraps it for an
``ItemIndex`` (ids, every exclusion form).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_SCORE_BYTES = 2 << 30  # one block's [queries, pool] float32 scores


def block_rows_for(pool_size: int, max_score_bytes: int = DEFAULT_SCORE_BYTES) -> int:
    """Queries per block so that a [block, pool] float32 score matrix fits ``max_score_bytes``."""
    return max(1, int(max_score_bytes) // (4 * max(1, int(pool_size))))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


class TorchExactIndex:
    """Exact inner-product top-k over ``items`` [n, d] held on ``device`` (see the module doc).

    ``items``: float32 vectors (normalized here when ``normalize``) or a tensor already prepared
    (taken as it is, moved to ``device`` if it is elsewhere). ``rows_of``: id -> row (-1 outside
    the pool) for callers that exclude by id (``models.retrieval``); rows by default."""

    def __init__(
        self,
        items: np.ndarray | torch.Tensor,
        *,
        device: str | torch.device = "cuda",
        normalize: bool = True,
        max_score_bytes: int = DEFAULT_SCORE_BYTES,
        rows_of: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.normalize = normalize
        self.max_score_bytes = int(max_score_bytes)
        if isinstance(items, torch.Tensor):
            tensor = items.detach().to(self.device, torch.float32)
        else:
            vectors = np.asarray(items, dtype=np.float32)
            if vectors.ndim != 2:
                raise ValueError(f"item vectors must be a 2-d [n, dim] array, got shape {vectors.shape}")
            tensor = torch.from_numpy(_unit_rows(vectors) if normalize else np.ascontiguousarray(vectors)).to(self.device)
        if tensor.ndim != 2 or not len(tensor):
            raise ValueError(f"the pool must be a non-empty [n, dim] matrix, got shape {tuple(tensor.shape)}")
        self.items = tensor.contiguous()
        size = len(self.items)
        self.rows_of = rows_of or (lambda v: np.where((v >= 0) & (v < size), v, -1))
        self._allowed: np.ndarray | None = None  # the last mask asked for, and its blocked columns
        self._blocked: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.items.shape[0])

    @property
    def dim(self) -> int:
        return int(self.items.shape[1])

    @property
    def block_rows(self) -> int:
        return block_rows_for(self.size, self.max_score_bytes)

    def _blocked_columns(self, allowed: np.ndarray | None) -> torch.Tensor | None:
        """Device indices of the rows outside ``allowed`` (kept for the next call with the same mask)."""
        if allowed is None:
            return None
        if allowed is not self._allowed:
            mask = np.asarray(allowed, dtype=bool)
            if mask.shape != (self.size,):
                raise ValueError(f"allowed must be a bool mask of the {self.size} pool rows, got shape {mask.shape}")
            blocked = np.flatnonzero(~mask)
            self._blocked = torch.from_numpy(blocked).to(self.device) if len(blocked) else None
            self._allowed = allowed
        return self._blocked

    @torch.no_grad()
    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        exclude: tuple[np.ndarray, np.ndarray] | None = None,
        allowed: np.ndarray | None = None,
        block_rows: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows [nq, k] (best first) and scores [nq, k].

        ``exclude``: (offsets [nq + 1], rows) in CSR form, query q excluding
        ``rows[offsets[q]:offsets[q + 1]]`` (rows outside 0..n-1 ignored). ``allowed``: a bool
        mask of the pool rows that may be returned (None: all). ``block_rows``: queries per
        matmul (default: from ``max_score_bytes``)."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [nq, {self.dim}], got shape {queries.shape}")
        nq, n = len(queries), self.size
        q = torch.from_numpy(_unit_rows(queries) if self.normalize else np.ascontiguousarray(queries)).to(self.device)
        excluded = _DeviceExclusions.upload(exclude, nq, n, self.device) if exclude is not None else None
        blocked = self._blocked_columns(allowed)
        step = max(1, int(block_rows or self.block_rows))
        top_rows, top_scores = self._blocked_topk(q, min(int(k), n), step, blocked, excluded)
        return _padded(top_rows, top_scores, k)

    def _blocked_topk(
        self, q: torch.Tensor, fetch: int, step: int, blocked: torch.Tensor | None, excluded: _DeviceExclusions | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``fetch`` rows and scores of ``q`` [nq, d], ``step`` queries per matmul, with the
        ``blocked`` columns and each query's ``excluded`` rows at -inf."""
        nq = len(q)
        out_rows = torch.empty((nq, fetch), dtype=torch.int64, device=self.device)
        out_scores = torch.empty((nq, fetch), dtype=torch.float32, device=self.device)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 products
        try:
            for lo in range(0, nq, step):
                hi = min(nq, lo + step)
                scores = q[lo:hi] @ self.items.T
                if blocked is not None:
                    scores.index_fill_(1, blocked, -torch.inf)
                if excluded is not None:
                    excluded.mask(scores, lo, hi)
                top_scores, top_rows = torch.topk(scores, fetch, dim=1)
                out_scores[lo:hi] = top_scores
                out_rows[lo:hi] = top_rows
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return out_rows, out_scores


@dataclass(frozen=True)
class _DeviceExclusions:
    """One call's in-pool exclusions on the device, uploaded once; each block slices its own part:
    query q excludes ``values[offsets[q]:offsets[q + 1]]`` (``counts`` = their lengths)."""

    offsets: np.ndarray  # int64 [nq + 1], on the host
    counts: torch.Tensor
    values: torch.Tensor

    @classmethod
    def upload(
        cls, exclude: tuple[np.ndarray, np.ndarray], nq: int, n: int, device: torch.device
    ) -> _DeviceExclusions | None:
        """The rows of ``exclude`` (offsets, rows) inside 0..n-1; None when there are none."""
        offsets, rows = (np.asarray(a, dtype=np.int64) for a in exclude)
        if len(offsets) != nq + 1:
            raise ValueError(f"exclusions are given for {len(offsets) - 1} queries, expected {nq}")
        rows = rows[offsets[0] : offsets[-1]]
        owner = np.repeat(np.arange(nq, dtype=np.int64), np.diff(offsets))
        keep = (rows >= 0) & (rows < n)
        owner, rows = owner[keep], rows[keep]
        if not len(rows):
            return None
        offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=nq))])
        return cls(offsets, torch.from_numpy(np.diff(offsets)).to(device), torch.from_numpy(rows).to(device))

    def mask(self, scores: torch.Tensor, lo: int, hi: int) -> None:
        """Set the excluded rows of queries ``lo:hi`` (the rows of ``scores``) to -inf."""
        start, stop = int(self.offsets[lo]), int(self.offsets[hi])
        if stop > start:
            owner = torch.repeat_interleave(
                torch.arange(hi - lo, device=self.values.device), self.counts[lo:hi], output_size=stop - start
            )
            scores[owner, self.values[start:stop]] = -torch.inf


def _padded(top_rows: torch.Tensor, top_scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The device's [nq, fetch] results as [nq, k] arrays, -1 / -inf where nothing is left to return
    (past the pool's end, excluded, or outside ``allowed``)."""
    nq, fetch = top_rows.shape
    rows_np = np.full((nq, k), -1, dtype=np.int64)
    scores_np = np.full((nq, k), -np.inf, dtype=np.float32)
    rows_np[:, :fetch] = top_rows.cpu().numpy()
    scores_np[:, :fetch] = top_scores.cpu().numpy()
    rows_np[~np.isfinite(scores_np)] = -1
    return rows_np, scores_np


__all__ = ["DEFAULT_SCORE_BYTES", "TorchExactIndex", "block_rows_for"]
