"""Scoring with a loaded checkpoint: the pool's item vectors, users' query vectors, the top-K
pool positions from an index (through Faiss or torch) and the lists' popularity fallback.

Ids: an index's id map holds creative ids (the submission's id space); everything scored is
kept as *pool positions* (0..C-1, the order of ``arrays.cand_*``), so targets, exclusions and
every method's lists are compared in one space.

Two pools: the index covers every candidate, the *released* pool (``arrays.cand_released``: the
published pool, or every candidate when nothing was published) plus the holdout targets the
warehouse added to it. ``PoolSearch`` recommends from the released pool unless asked for the
whole index (``extended``).

Search backends: Faiss on the CPU, or exact matmul + top-k in torch with the pool's vectors held
on the device (models/torch_search.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.baselines import popularity_order
from models.checkpoint_fit import LoadedModel
from models.data import Arrays, trim_padding
from models.metrics import K
from models.retrieval import ItemIndex, search, torch_exact_search, torch_index
from models.runtime import to_device

CHUNK_USERS = 65_536  # users per chunk: the index is searched and every list scored per chunk
ITEM_BATCH = 65_536
FAISS = "faiss"


# --- Vectors -----------------------------------------------------------------------------
@torch.no_grad()
def pool_item_vectors(loaded: LoadedModel, arrays: Arrays, device: torch.device) -> np.ndarray:
    """Retrieval keys [C, d] of every candidate (pool order), cold items through their
    features, multi-modal embeddings and Semantic IDs."""
    rows = np.asarray(arrays.cand_rows).astype(np.int64)
    parts = [
        loaded.model.item_vectors(torch.from_numpy(rows[i : i + ITEM_BATCH]).to(device)).float().cpu().numpy()
        for i in range(0, len(rows), ITEM_BATCH)
    ]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


@torch.no_grad()
def query_vectors(
    loaded: LoadedModel, inputs: dict[str, np.ndarray], device: torch.device, batch_size: int = 4096
) -> np.ndarray:
    """User vectors [n, d] for model inputs of n users (``holdout_batch``'s keys), encoded
    ``batch_size`` users at a time. Users are encoded in order of history length and each
    batch is trimmed to its longest history (the same vectors: the encoder masks padding),
    so short histories do not pay for 100 positions."""
    n = len(inputs["items"])
    out = np.zeros((n, loaded.model.cfg.vector_dim), np.float32)
    order = np.argsort((inputs["items"] > 0).sum(axis=1), kind="stable")
    for lo in range(0, n, batch_size):
        rows = order[lo : lo + batch_size]
        batch = to_device(trim_padding({key: value[rows] for key, value in inputs.items()}), device)
        out[rows] = loaded.model.user_vectors(batch, loaded.actions).float().cpu().numpy()
    return out


def encode_users(
    loaded: LoadedModel, inputs_of: Callable[[int, int], dict[str, np.ndarray]], n: int, out: np.ndarray,
    device: torch.device, batch_size: int, logger: logging.Logger, what: str,
) -> None:
    """``query_vectors`` of users 0..n-1 into ``out``, ``CHUNK_USERS`` users at a time
    (``inputs_of(lo, hi)``: the model inputs of users lo..hi-1)."""
    started = time.perf_counter()
    for lo in range(0, n, CHUNK_USERS):
        hi = min(n, lo + CHUNK_USERS)
        out[lo:hi] = query_vectors(loaded, inputs_of(lo, hi), device, batch_size)
        elapsed = time.perf_counter() - started
        logger.info(f"'{loaded.preset}': encoded {hi:,}/{n:,} {what} users ({hi / max(elapsed, 1e-9):,.0f} users/s)")


def pool_positions(arrays: Arrays) -> np.ndarray:
    """item row -> pool position (-1: not a candidate); row 0 (padding) is never a candidate."""
    cand_rows = np.asarray(arrays.cand_rows).astype(np.int64)
    position = np.full(int(arrays.meta["num_item_rows"]), -1, np.int64)
    position[cand_rows] = np.arange(len(cand_rows))
    return position


def as_ids(positions: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Pool positions as ids (``ids``: pool position -> id); -1 stays -1."""
    return np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """A deterministic sorted sample of ``size`` row numbers out of ``n``."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


# --- Search ------------------------------------------------------------------------------
def search_backend(asked: str, device: torch.device) -> str:
    """``faiss``, or ``torch-<device type>`` (``asked``: faiss, torch or auto; ``auto``: torch on
    a CUDA device, whatever the index kind: exact top-K over the pool's vectors (an IVF / HNSW
    index's read back) takes seconds there, so a GPU scores without the approximation; Faiss
    on a CPU, with the index as built)."""
    use_torch = asked == "torch" or (asked == "auto" and device.type == "cuda")
    return f"torch-{device.type}" if use_torch else FAISS


@dataclass
class PoolSearch:
    """Top-K pool positions from one index, through Faiss or through torch on the device (the
    pool's vectors uploaded once, for every chunk of users), the released pool or all of it."""

    index: ItemIndex
    backend: str
    released: np.ndarray | None  # ``released_mask``
    exact: Any = None  # the TorchExactIndex, for a torch backend

    @classmethod
    def open(cls, index: ItemIndex, backend: str, device: torch.device, released: np.ndarray | None) -> PoolSearch:
        exact = torch_index(index, str(device)) if backend != FAISS else None
        return cls(index, backend, released, exact)

    def describe(self) -> str:
        kind = self.index.spec.describe()
        if self.exact is not None and self.index.spec.kind != "flat":
            return f"exact over the vectors of {kind}"
        return kind

    def top_k(self, queries: np.ndarray, exclude_ids: Any, *, extended: bool = False) -> np.ndarray:
        """[n, K] pool positions (-1: nothing left); ``extended``: the whole index, not only
        the released pool."""
        allowed = None if extended else self.released
        if self.exact is not None:
            rows, scores = torch_exact_search(self.exact, queries, K, exclude=exclude_ids, allowed=allowed)
        else:
            rows, scores = search(self.index, queries, K, exclude=exclude_ids, return_rows=True, allowed=allowed)
        # Equal scores (items with the same vector) in pool order, whatever order the backend left them in.
        order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores), axis=1)
        return np.take_along_axis(rows, order, axis=1)


@dataclass
class ScoringSetup:
    """The arrays, a checkpoint and the index built from it, checked together."""

    device: torch.device
    arrays: Arrays
    loaded: LoadedModel
    index: ItemIndex
    creative: np.ndarray  # pool position -> creative id
    position: np.ndarray  # item row -> pool position
    n_hold: int
    released: np.ndarray | None  # pool position -> in the released pool (None: all are)
    search: PoolSearch  # the index's top-K, with the backend the settings pick

    @property
    def released_positions(self) -> np.ndarray:
        n = len(self.creative)
        return np.arange(n) if self.released is None else np.flatnonzero(self.released)


# --- Lists -------------------------------------------------------------------------------
def released_popularity(arrays: Arrays, actions: tuple[int, ...], released: np.ndarray | None) -> np.ndarray:
    """``popularity_order`` restricted to the released pool."""
    order = popularity_order(arrays, actions)
    return order if released is None else order[released[order]]


def fill_lists(top: np.ndarray, fallback: np.ndarray, exclude: np.ndarray | None, k: int = K) -> np.ndarray:
    """Fill -1 slots of ``top`` (pool positions) from ``fallback`` (positions, best first),
    skipping ids already listed or excluded; only rows with holes are touched."""
    top = top.copy()
    for r in np.flatnonzero((top < 0).any(axis=1)):
        taken = set(top[r][top[r] >= 0].tolist()) | (set(exclude[r].tolist()) if exclude is not None else set())
        extra = [p for p in fallback[: k + len(taken) + k].tolist() if p not in taken]
        if len(extra) < int((top[r] < 0).sum()):  # the whole pool minus the history is too small
            extra += [p for p in fallback.tolist() if p not in taken and p not in extra]
        holes = np.flatnonzero(top[r] < 0)
        top[r, holes] = extra[: len(holes)]
    return top


__all__ = [
    "CHUNK_USERS",
    "FAISS",
    "PoolSearch",
    "ScoringSetup",
    "as_ids",
    "encode_users",
    "fill_lists",
    "pool_item_vectors",
    "pool_positions",
    "query_vectors",
    "released_popularity",
    "sample_rows",
    "search_backend",
]
