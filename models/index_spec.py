"""Which Faiss index to build over the candidate pool, and its default for a pool size.

* **Exact up to ``FLAT_MAX_POOL`` items, IVF above.** Exact search costs ``2 * pool * dim``
  FLOP per query; measured here (64-d, 2 cores) ~5 us of CPU per 1K items per query, so a
  1M-user evaluation takes ~1-2 minutes at 20K items (history exclusion included), ~5 at
  100K and ~30 at 660K. Up to 20K items exact search is cheap enough and needs no training
  (recall 1); above, IVF scans ``nprobe / nlist`` of the pool (numbers in
  ``default_index_spec``; benchmarks/bench_retrieval.py measures them).
* **HNSW is available but never the default**: user vectors are out of the item distribution
  (a mixture of interests, not an item), and graph search started from item neighbourhoods
  loses recall on such queries (the issue measured 0.3-0.7 recall@10 on trained vectors at
  default settings where IVF held 0.93-0.99; on the synthetic benchmark HNSW needs
  efSearch 256-512 for 0.99 and is no faster than IVF there, after a 4-minute build). IVF's
  recall only depends on how many lists are scanned, so a floor is met by raising ``nprobe``
  (``models.index_tuning.tune_nprobe``: the smallest nprobe reaching a recall target on
  sample queries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from models.retrieval_errors import RetrievalError

# Exact search up to this many items; IVF above (see the module docstring and
# default_index_spec for the cost model behind both numbers).
FLAT_MAX_POOL = 20_000
# IVF training: k-means on at most this many points per list (faiss warns below 39).
TRAIN_POINTS_PER_LIST = 64
MIN_POINTS_PER_LIST = 39

IndexKind = Literal["flat", "ivf", "hnsw"]


@dataclass(frozen=True)
class IndexSpec:
    """Which Faiss index to build. ``nlist=None`` picks ``auto_nlist(pool size)``."""

    kind: IndexKind = "flat"
    nlist: int | None = None  # IVF: number of inverted lists (k-means centroids)
    nprobe: int = 32  # IVF: lists scanned per query
    M: int = 32  # HNSW: graph degree
    ef_construction: int = 200  # HNSW: beam width while building
    ef_search: int = 128  # HNSW: beam width while searching (raised to k' when smaller)
    # Cosine (vectors L2-normalized at build and search time) or raw inner product (a model
    # trained on dot-product scores, such as the official-baseline preset).
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf", "hnsw"):
            raise RetrievalError(f"index kind must be 'flat', 'ivf' or 'hnsw', got {self.kind!r}")
        for name in ("nprobe", "M", "ef_construction", "ef_search"):
            if int(getattr(self, name)) < 1:
                raise RetrievalError(f"IndexSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise RetrievalError(f"IndexSpec.nlist must be >= 1 or None, got {self.nlist}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IndexSpec:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def describe(self) -> str:
        if self.kind == "flat":
            return "flat (exact)"
        if self.kind == "ivf":
            return f"ivf (nlist={self.nlist}, nprobe={self.nprobe})"
        return f"hnsw (M={self.M}, efConstruction={self.ef_construction}, efSearch={self.ef_search})"


def auto_nlist(pool_size: int) -> int:
    """~2.5 * sqrt(n) lists rounded to a power of two (2048 at 660K items, 4096 at the 10M
    pool's 3.6M), never fewer than ``MIN_POINTS_PER_LIST`` items per list."""
    n = max(1, int(pool_size))
    nlist = 2 ** round(math.log2(max(1.0, 2.5 * math.sqrt(n))))
    return int(max(1, min(nlist, n // MIN_POINTS_PER_LIST)))


def default_index_spec(pool_size: int) -> IndexSpec:
    """Exact search up to ``FLAT_MAX_POOL`` items, IVF above.

    IVF: ``auto_nlist`` lists, ``nprobe`` = 2% of them (at least 16). Measured at 660K x 64-d
    on out-of-distribution queries (topic mixtures) with ~90 history items excluded per user
    (bench_retrieval.py, nlist 2048; time = 1M users on 2 idle cores, from CPU time):

        nprobe (scanned)   moderate data: recall@10, time    hard data: recall@10, time
        8 (0.4%)           0.994,  43 s                      -
        20 (1%)            0.9985, 63 s                      0.953, 79 s
        41 (2%) default    0.9996, 114-124 s                 0.972, 128-147 s
        72 (3.5%)          1.0000, 224 s                     0.983, 236 s
        136 (6.6%)         -                                 0.992, 340 s

    nlist 4096 gains ~0.1-0.5 points of recall at the same share on hard data but builds 3-5x
    slower (k-means) and pays twice the coarse step. How hard real user vectors are is only
    known from them: the index asset should measure recall@10 on a sample of real queries
    and pick nprobe with ``tune_nprobe``; 2% is the starting point, not a guarantee.
    """
    if pool_size < 1:
        raise RetrievalError("the candidate pool is empty: nothing to index")
    if pool_size <= FLAT_MAX_POOL:
        return IndexSpec(kind="flat")
    nlist = auto_nlist(pool_size)
    return IndexSpec(kind="ivf", nlist=nlist, nprobe=default_nprobe(nlist))


def default_nprobe(nlist: int) -> int:
    """2% of the lists, at least 16 (all of them for fewer than 16)."""
    return int(min(nlist, max(16, round(nlist * 0.02))))


__all__ = [
    "FLAT_MAX_POOL",
    "MIN_POINTS_PER_LIST",
    "TRAIN_POINTS_PER_LIST",
    "IndexKind",
    "IndexSpec",
    "auto_nlist",
    "default_index_spec",
    "default_nprobe",
]
