"""Top-k retrieval over the candidate pool with Faiss (inner product on L2-normalized vectors).

    item vectors  --normalize-->  IndexFlatIP | IndexIVFFlat | IndexHNSWFlat   (rows 0..n-1)
    user vectors  --normalize-->  search(k + max exclusions)  --drop history items-->  top-k
    row -> id through the index's id map (creative ids, or retrieval ids: the caller's choice)

Decisions:

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
  (``tune_nprobe``: the smallest nprobe reaching a recall target on sample queries).
* **Exclusions** (a user's history items) are filtered after the search: each batch fetches
  ``k + m`` neighbours, m = the most in-pool exclusions of a query in the batch, and keeps
  the first k that are not excluded (vectorized with numpy, no per-user Python loop). The
  over-fetch is cheap: an IVF scan costs about the same for k = 10 and k = 110 (+10%), and
  the filter is sort + searchsorted (~0.02 ms a query). Exclusion ids are in the same id
  space as the index's id map; ids not in the pool (padding such as 0 or -1) are ignored.
* **IVF queries are searched in list order** (sorted by their nearest list, then
  ``search_preassigned``): the scan is memory-bound and neighbouring queries then reuse the
  lists in cache, ~25% faster for identical results.
* Faiss uses every core by default (``threads``); the vectors are float32 and normalized
  once, at build time, and per query batch at search time (scores are cosines).
* **A subset of the pool** (``allowed``, a bool mask of rows: the released pool when the
  index also holds targets the warehouse added) is searched through a Faiss ``IDSelector``
  bitmap, without over-fetch; the exact and approximate indexes all honour it.
* ``torch_exact_search`` / ``torch_index`` are the exact alternative for a GPU
  (models/torch_search.py: the pool uploaded once, blocked matmul + topk, exclusions masked to
  -inf instead of over-fetched); faiss-cpu stays for the CPU and for IVF / HNSW.

Saved layout (one folder, written with ``atomic_dir``: the old complete index stays in place
until the new one is complete):

    <path>/index.faiss       faiss.write_index
    <path>/ids.npy           int64 row -> id
    <path>/metadata.json     format, spec, dim, pool size, id-map hash, checkpoint version, ...

``load_index`` refuses a folder whose parts disagree, or one built from another checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

import faiss
import numpy as np
import pyarrow as pa

from taac_dagster.atomic import atomic_dir
from taac_dagster.errors import TaacError

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
METADATA_FILE = "metadata.json"

# Exact search up to this many items; IVF above (see the module docstring and
# default_index_spec for the cost model behind both numbers).
FLAT_MAX_POOL = 20_000
# IVF training: k-means on at most this many points per list (faiss warns below 39).
TRAIN_POINTS_PER_LIST = 64
MIN_POINTS_PER_LIST = 39

IndexKind = Literal["flat", "ivf", "hnsw"]


@dataclass(frozen=True)
class ExclusionCSR:
    """Per-query exclusion ids in CSR form: query q excludes values[offsets[q]:offsets[q + 1]]."""

    offsets: np.ndarray  # int64 [nq + 1], offsets[0] == 0
    values: np.ndarray  # int64


# Per-query exclusions: a sequence of 1-d arrays / lists, a padded 2-d array (padding = any id
# not in the pool, e.g. 0 or -1), a pyarrow list array (DuckDB's history lists), or CSR.
Exclusions = Sequence[Any] | np.ndarray | pa.Array | pa.ChunkedArray | ExclusionCSR


class RetrievalError(TaacError, ValueError):
    """Bad input to the retrieval code: empty pool, wrong dimension, mismatched index."""


class IndexMismatchError(RetrievalError):
    """A saved index does not belong to the checkpoint / pool it is being used with."""


# --- Specs -------------------------------------------------------------------------------
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


# --- The index ---------------------------------------------------------------------------
def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None = None) -> int:
    """Faiss (OpenMP) threads; None = every core this process may use."""
    threads = default_threads() if threads is None else max(1, int(threads))
    faiss.omp_set_num_threads(threads)
    return threads


@dataclass
class ItemIndex:
    """A Faiss index over the pool (rows 0..n-1) with its id map (row -> id)."""

    index: faiss.Index
    ids: np.ndarray  # int64 [n]
    spec: IndexSpec
    metadata: dict[str, Any] = field(default_factory=dict)
    _lookup: np.ndarray | None = field(init=False, repr=False, default=None)
    _sorted_ids: np.ndarray = field(init=False, repr=False)
    _sorted_rows: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ids = np.ascontiguousarray(self.ids, dtype=np.int64)
        if self.index.ntotal != len(self.ids):
            raise IndexMismatchError(
                f"the faiss index holds {self.index.ntotal} vectors but the id map has {len(self.ids)} ids"
            )
        n = len(self.ids)
        if n and self.ids.min() >= 0 and self.ids.max() < 4 * n + (1 << 20):
            # Small ids (retrieval ids, re-ids): a dense id -> row table, O(1) per lookup.
            self._lookup = np.full(int(self.ids.max()) + 1, -1, dtype=np.int64)
            self._lookup[self.ids] = np.arange(n)
        self._sorted_rows = np.argsort(self.ids, kind="stable")
        self._sorted_ids = self.ids[self._sorted_rows]
        self.configure()

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def configure(self, *, nprobe: int | None = None, ef_search: int | None = None) -> ItemIndex:
        """Set the search-time knobs (recorded in ``spec``); None keeps the spec's value."""
        spec = replace(
            self.spec,
            nprobe=self.spec.nprobe if nprobe is None else int(nprobe),
            ef_search=self.spec.ef_search if ef_search is None else int(ef_search),
        )
        self.spec = spec
        if spec.kind == "ivf":
            faiss.extract_index_ivf(self.index).nprobe = min(spec.nprobe, spec.nlist or spec.nprobe)
        elif spec.kind == "hnsw":
            self.index.hnsw.efSearch = spec.ef_search
        return self

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id in the pool, -1 where the id is not in the pool."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._lookup is not None:
            inside = (ids >= 0) & (ids < len(self._lookup))
            return np.where(inside, self._lookup[np.where(inside, ids, 0)], -1)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.minimum(pos, len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos] == ids
        return np.where(found, self._sorted_rows[pos], -1)


def pool_fingerprint(ids: np.ndarray) -> str:
    """blake2b of the id map (order matters): ties an index to the pool it was built for."""
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


def normalize_rows(vectors: np.ndarray, *, what: str = "vectors", normalize: bool = True) -> np.ndarray:
    """float32 copy with unit L2 rows (zero rows stay zero; ``normalize=False``: as they are);
    refuses NaN / inf."""
    x = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if x.ndim != 2:
        raise RetrievalError(f"{what} must be a 2-d [n, dim] array, got shape {x.shape}")
    if x.size and not np.isfinite(x).all():
        bad = int((~np.isfinite(x).all(axis=1)).sum())
        raise RetrievalError(f"{what}: {bad} rows contain NaN or infinite values")
    if x.size and normalize:
        faiss.normalize_L2(x)
    return x


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    spec: IndexSpec | None = None,
    *,
    seed: int = 0,
    threads: int | None = None,
) -> ItemIndex:
    """Index ``vectors`` [n, dim] (normalized here) with row i standing for ``ids[i]``.

    ``spec=None`` picks ``default_index_spec(n)``. IVF trains spherical k-means on a seeded
    sample of at most ``TRAIN_POINTS_PER_LIST * nlist`` items; ``nlist`` is lowered to keep at
    least ``MIN_POINTS_PER_LIST`` items per list.
    """
    ids = np.asarray(ids)
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise RetrievalError(f"item vectors must be a 2-d [n, dim] array, got shape {vectors.shape}")
    n, dim = vectors.shape
    if n == 0:
        raise RetrievalError("the candidate pool is empty: no item vectors to index")
    if dim == 0:
        raise RetrievalError("item vectors have dimension 0")
    if ids.shape != (n,):
        raise RetrievalError(f"expected one id per vector ({n}), got an id array of shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise RetrievalError(f"ids must be integers (creative or retrieval ids), got dtype {ids.dtype}")
    sorted_ids = np.sort(ids)
    duplicates = int((sorted_ids[1:] == sorted_ids[:-1]).sum())
    if duplicates:
        raise RetrievalError(f"ids must be unique: {duplicates} duplicates in the id map")
    spec = spec or default_index_spec(n)
    set_threads(threads)
    x = normalize_rows(vectors, what="item vectors", normalize=spec.normalize)
    started = time.perf_counter()

    if spec.kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
        index.add(x)
    elif spec.kind == "ivf":
        nlist = min(spec.nlist or auto_nlist(n), max(1, n // MIN_POINTS_PER_LIST))
        spec = replace(spec, nlist=nlist)
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        cp = faiss.extract_index_ivf(index).cp
        cp.seed = int(seed)
        cp.spherical = spec.normalize  # centroids on the sphere, like the vectors
        cp.niter = 10  # list quality barely moves after 10 iterations; build time halves
        cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        cp.min_points_per_centroid = 1
        sample = min(n, TRAIN_POINTS_PER_LIST * nlist)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False)) if sample < n else slice(None)
        index.train(x[rows])
        index.add(x)
    else:  # hnsw
        index = faiss.IndexHNSWFlat(dim, spec.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        index.add(x)  # multi-threaded insertion: two builds may differ slightly
    built = ItemIndex(index=index, ids=ids.astype(np.int64), spec=spec)
    built.metadata.update({"build_seconds": round(time.perf_counter() - started, 3), "seed": int(seed)})
    return built


# --- Search ------------------------------------------------------------------------------
def as_csr(exclude: Exclusions, num_queries: int) -> ExclusionCSR:
    """Per-query exclusion ids as CSR (offsets [nq + 1], values), whatever the input form."""
    if isinstance(exclude, ExclusionCSR):
        offsets = np.asarray(exclude.offsets, dtype=np.int64)
        values = np.asarray(exclude.values, dtype=np.int64)
    elif isinstance(exclude, (pa.Array, pa.ChunkedArray)):
        arr = exclude.combine_chunks() if isinstance(exclude, pa.ChunkedArray) else exclude
        arr = arr.cast(pa.large_list(pa.int64()))
        offsets = arr.offsets.to_numpy().astype(np.int64)
        values = arr.values.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = offsets - offsets[0]  # a sliced array
        values = values[: offsets[-1]] if len(offsets) else values[:0]
    elif isinstance(exclude, np.ndarray) and exclude.ndim == 2:
        width = exclude.shape[1]
        offsets = np.arange(exclude.shape[0] + 1, dtype=np.int64) * width
        values = exclude.astype(np.int64).ravel()
    else:
        parts = [np.asarray(p if p is not None else [], dtype=np.int64).ravel() for p in exclude]
        lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if len(offsets) != num_queries + 1:
        raise RetrievalError(f"exclusions are given for {len(offsets) - 1} queries, expected {num_queries}")
    return ExclusionCSR(offsets, values)


def batch_exclusions(
    csr: ExclusionCSR, lo: int, hi: int, rows_of: Callable[[np.ndarray], np.ndarray], num_rows: int
) -> tuple[np.ndarray | None, int]:
    """The exclusions of queries ``lo:hi`` as sorted keys ``(query - lo) * num_rows + row``
    (ids outside the pool dropped) and the most any one query has (an upper bound of the
    over-fetch: a repeated id counts twice). Sorting, not ``np.unique``: numpy 2.4's unique is
    ~15x slower than a sort on these arrays."""
    start, stop = csr.offsets[lo], csr.offsets[hi]
    rows = rows_of(csr.values[start:stop])
    owner = np.repeat(np.arange(hi - lo, dtype=np.int64), np.diff(csr.offsets[lo : hi + 1]))
    keep = rows >= 0
    if not keep.any():
        return None, 0
    owner = owner[keep]
    keys = np.sort(owner * num_rows + rows[keep])
    return keys, int(np.bincount(owner, minlength=hi - lo).max())


def filter_topk(
    labels: np.ndarray, scores: np.ndarray, excluded_keys: np.ndarray | None, num_rows: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep, per query, the first ``k`` labels that are valid (>= 0) and not excluded.

    ``excluded_keys`` = query * num_rows + row for each (query, excluded row) pair of this
    batch. Missing slots get label -1 and score -inf.
    """
    bad = labels < 0
    if excluded_keys is not None and len(excluded_keys):
        keys = np.arange(len(labels), dtype=np.int64)[:, None] * num_rows + labels
        pos = np.minimum(np.searchsorted(excluded_keys, keys), len(excluded_keys) - 1)
        bad |= excluded_keys[pos] == keys
    if labels.shape[1] == k and not bad.any():
        return labels, scores
    good = ~bad
    slot = np.cumsum(good, axis=1) - 1  # where each good label lands in the output
    take = good & (slot < k)
    r, c = np.nonzero(take)
    out_labels = np.full((len(labels), k), -1, dtype=np.int64)
    out_scores = np.full((len(labels), k), -np.inf, dtype=np.float32)
    out_labels[r, slot[r, c]] = labels[r, c]
    out_scores[r, slot[r, c]] = scores[r, c]
    return out_labels, out_scores


def allowed_params(index: ItemIndex, allowed: np.ndarray | None) -> tuple[Any, Any]:
    """Faiss search parameters restricting results to the rows of the bool mask ``allowed``
    (None, or a mask allowing every row: no parameters). Returns (params, what must stay alive
    while they are used: the bitmap and its selector)."""
    if allowed is None:
        return None, None
    mask = np.asarray(allowed, dtype=bool)
    if mask.shape != (index.size,):
        raise RetrievalError(f"allowed must be a bool mask of the {index.size} pool rows, got shape {mask.shape}")
    if mask.all():
        return None, None
    bits = np.packbits(mask, bitorder="little")
    selector = faiss.IDSelectorBitmap(index.size, faiss.swig_ptr(bits))
    if index.spec.kind == "ivf":
        params = faiss.SearchParametersIVF(sel=selector, nprobe=faiss.extract_index_ivf(index.index).nprobe)
    elif index.spec.kind == "hnsw":
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=index.index.hnsw.efSearch)
    else:
        params = faiss.SearchParameters(sel=selector)
    return params, (bits, selector)


def _faiss_search(index: ItemIndex, q: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``index.index.search``; for IVF, queries are first sorted by their nearest list so that
    neighbouring queries (one thread's share) scan the same lists while they are in cache:
    the scan is memory-bound, and this saves ~30% at 660K x 64-d. Same results. ``params``:
    ``allowed_params``'s (Faiss's ``search_preassigned`` takes none, so the lists are then
    assigned twice: once to sort, once in the search)."""
    if index.spec.kind != "ivf" or len(q) < 256:
        return index.index.search(q, k, params=params) if params is not None else index.index.search(q, k)
    ivf = faiss.extract_index_ivf(index.index)
    coarse_scores, lists = ivf.quantizer.search(q, ivf.nprobe)
    order = np.argsort(lists[:, 0], kind="stable")
    if params is not None:
        scores, labels = index.index.search(q[order], k, params=params)
    else:
        scores, labels = ivf.search_preassigned(q[order], k, lists[order], coarse_scores[order])
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return scores[inverse], labels[inverse]


def search(
    index: ItemIndex,
    queries: np.ndarray,
    k: int = 10,
    *,
    exclude: Exclusions | None = None,
    batch_size: int = 16_384,
    threads: int | None = None,
    return_rows: bool = False,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ids [nq, k] (best first) and cosine scores [nq, k] for each query vector.

    ``exclude``: per-query ids (the index's id space) that must not be returned, e.g. the
    user's history items. ``allowed``: a bool mask of the pool rows that may be returned
    (e.g. the released pool); None: every row. A slot that cannot be filled (pool too small,
    IVF lists too short) holds id -1 and score -inf. ``return_rows`` returns pool rows instead
    of ids.
    """
    queries = np.asarray(queries)
    if queries.ndim != 2:
        raise RetrievalError(f"queries must be a 2-d [nq, dim] array, got shape {queries.shape}")
    if queries.shape[1] != index.dim:
        raise RetrievalError(
            f"query dimension {queries.shape[1]} does not match the index dimension {index.dim} "
            "(was the index built from another checkpoint?)"
        )
    if k < 1:
        raise RetrievalError(f"k must be >= 1, got {k}")
    nq = len(queries)
    set_threads(threads)
    csr = as_csr(exclude, nq) if exclude is not None else None
    params, _alive = allowed_params(index, allowed)
    out_rows = np.full((nq, k), -1, dtype=np.int64)
    out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
    n = index.size
    for lo in range(0, nq, batch_size):
        hi = min(nq, lo + batch_size)
        q = normalize_rows(queries[lo:hi], what="queries", normalize=index.spec.normalize)
        keys, extra = batch_exclusions(csr, lo, hi, index.rows_of, n) if csr is not None else (None, 0)
        fetch = min(n, k + extra)
        scores, labels = _faiss_search(index, q, fetch, params)
        labels, scores = filter_topk(labels, scores, keys, n, k)
        out_rows[lo:hi] = labels
        out_scores[lo:hi] = scores
    if return_rows:
        return out_rows, out_scores
    ids = np.where(out_rows >= 0, index.ids[np.maximum(out_rows, 0)], -1)
    return ids, out_scores


def torch_index(index: ItemIndex | np.ndarray, device: str = "cuda", *, max_score_bytes: int | None = None) -> Any:
    """A ``TorchExactIndex`` (models/torch_search.py) over the vectors of ``index``, uploaded to
    ``device`` once: a flat ``ItemIndex``'s own (normalized at build; an IVF / HNSW index's are
    read back, and searched exactly), excluded by id through its id map; or item vectors
    [n, dim], normalized here, excluded by row."""
    from models.torch_search import DEFAULT_SCORE_BYTES, TorchExactIndex  # torch: heavy, only here

    budget = DEFAULT_SCORE_BYTES if max_score_bytes is None else max_score_bytes
    if isinstance(index, ItemIndex):
        vectors = flat_like(index).index.reconstruct_n(0, index.size)
        import torch

        # Taken as stored: the index's own (normalized) vectors, so scores match Faiss's.
        return TorchExactIndex(torch.from_numpy(np.ascontiguousarray(vectors)), device=device,
                               normalize=index.spec.normalize, max_score_bytes=budget, rows_of=index.rows_of)
    return TorchExactIndex(normalize_rows(index, what="item vectors"), device=device, max_score_bytes=budget)


def torch_exact_search(
    index: Any,
    queries: np.ndarray,
    k: int = 10,
    *,
    exclude: Exclusions | None = None,
    allowed: np.ndarray | None = None,
    device: str = "cuda",
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` pool rows [nq, k] and scores with a torch matmul + topk (for a GPU).

    ``index``: a ``TorchExactIndex`` already on its device (``torch_index``: reuse it across
    calls, the pool is uploaded once), or what ``torch_index`` takes (uploaded for this call).
    Exclusions (ids of the index's id space, any form ``search`` takes) and the rows outside
    ``allowed`` are masked to -inf before the top-k, so there is no over-fetch. ``batch_size``:
    queries per matmul (default: as many as keep the [batch, pool] scores under 2 GiB).
    Returns rows (not ids) and scores, like ``search(..., return_rows=True)``: -1 / -inf where
    nothing is left to return."""
    from models.torch_search import TorchExactIndex

    tindex = index if isinstance(index, TorchExactIndex) else torch_index(index, device)
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[1] != tindex.dim:
        raise RetrievalError(f"query dimension {queries.shape[-1]} does not match the item dimension {tindex.dim}")
    q = normalize_rows(queries, what="queries", normalize=tindex.normalize)  # refuses NaN / inf
    rows = None
    if exclude is not None:
        csr = as_csr(exclude, len(q))
        rows = (csr.offsets, tindex.rows_of(csr.values))
    return tindex.search(q, k, exclude=rows, allowed=allowed, block_rows=batch_size)


# --- Recall ------------------------------------------------------------------------------
def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |approx top-k  ∩  exact top-k| / |exact top-k| (-1 slots ignored)."""
    approx = np.asarray(approx_ids)[:, :k]
    exact = np.asarray(exact_ids)[:, :k]
    if approx.shape[0] != exact.shape[0]:
        raise RetrievalError(f"recall needs the same queries: {approx.shape[0]} vs {exact.shape[0]} rows")
    if not len(exact):
        return float("nan")
    valid = exact >= 0
    found = (exact[:, :, None] == approx[:, None, :]).any(axis=2) & valid
    denom = valid.sum(axis=1)
    per_query = np.where(denom > 0, found.sum(axis=1) / np.maximum(denom, 1), 1.0)
    return float(per_query.mean())


def measure_recall(
    index: ItemIndex,
    exact_index: ItemIndex,
    sample_queries: np.ndarray,
    k: int = 10,
    *,
    exclude: Exclusions | None = None,
) -> float:
    """recall@k of ``index`` against exact search (``exact_index``, a flat index over the same
    pool and ids) on ``sample_queries``, with the same exclusions applied to both."""
    if exact_index.spec.kind != "flat":
        raise RetrievalError(f"the reference index must be exact (flat), got {exact_index.spec.kind}")
    if exact_index.size != index.size or not np.array_equal(exact_index.ids, index.ids):
        raise RetrievalError("the reference index covers another pool (its id map differs)")
    approx, _ = search(index, sample_queries, k, exclude=exclude)
    exact, _ = search(exact_index, sample_queries, k, exclude=exclude)
    return recall_at_k(approx, exact, k)


def _climb(
    index: ItemIndex,
    exact_index: ItemIndex,
    sample_queries: np.ndarray,
    target: float,
    k: int,
    exclude: Exclusions | None,
    knob: str,
    start: int,
    limit: int,
    grow: Callable[[int], int],
) -> tuple[int, float]:
    """Raise the search knob ``knob`` (nprobe or ef_search) along ``grow`` until recall@k on
    the sample reaches ``target`` or the knob reaches ``limit``; the index keeps the value, and
    its metadata the climb (``recall_tuning``: knob, target, [value, recall] per step)."""
    exact, _ = search(exact_index, sample_queries, k, exclude=exclude)
    value = max(1, min(start, limit))
    steps: list[list[float]] = []
    index.metadata["recall_tuning"] = {"knob": knob, "target": target, "k": k, "steps": steps}
    while True:
        index.configure(**{knob: value})
        recall = recall_at_k(search(index, sample_queries, k, exclude=exclude)[0], exact, k)
        steps.append([value, round(float(recall), 5)])
        if recall >= target or value >= limit:
            return value, recall
        value = min(limit, max(value + 1, grow(value)))


def tune_nprobe(
    index: ItemIndex,
    exact_index: ItemIndex,
    sample_queries: np.ndarray,
    target: float = 0.99,
    k: int = 10,
    *,
    exclude: Exclusions | None = None,
    start: int | None = None,
    max_nprobe: int | None = None,
) -> tuple[int, float]:
    """The smallest ``nprobe`` on a x1.5 ladder from ``start`` (default: the spec's) whose
    recall@k on the sample reaches ``target`` (or every list, if none does); leaves the index
    configured with it. Returns (nprobe, recall). The exact reference is searched once; each
    step costs one IVF search of the sample (~0.2 s for 2,000 queries at 660K items)."""
    if index.spec.kind != "ivf":
        raise RetrievalError(f"tune_nprobe needs an IVF index, got {index.spec.kind}")
    limit = min(index.spec.nlist or 1, max_nprobe or index.spec.nlist or 1)
    return _climb(index, exact_index, sample_queries, target, k, exclude, "nprobe",
                  start or index.spec.nprobe, limit, lambda v: int(v * 1.5))


def tune_ef_search(
    index: ItemIndex,
    exact_index: ItemIndex,
    sample_queries: np.ndarray,
    target: float = 0.99,
    k: int = 10,
    *,
    exclude: Exclusions | None = None,
    max_ef: int = 4096,
) -> tuple[int, float]:
    """HNSW's counterpart of ``tune_nprobe``: the smallest efSearch on a x2 ladder from the
    spec's whose recall@k on the sample reaches ``target`` (or ``max_ef``). Returns (ef, recall)."""
    if index.spec.kind != "hnsw":
        raise RetrievalError(f"tune_ef_search needs an HNSW index, got {index.spec.kind}")
    return _climb(index, exact_index, sample_queries, target, k, exclude, "ef_search",
                  index.spec.ef_search, max_ef, lambda v: v * 2)


def flat_like(index: ItemIndex) -> ItemIndex:
    """An exact index over the same vectors and ids (IVF-Flat and HNSW-Flat keep the vectors)."""
    if index.spec.kind == "flat":
        return index
    vectors = index.index.reconstruct_n(0, index.size) if index.spec.kind == "hnsw" else _ivf_vectors(index)
    flat = faiss.IndexFlatIP(index.dim)
    flat.add(vectors)
    return ItemIndex(index=flat, ids=index.ids.copy(), spec=IndexSpec(kind="flat"))


def _ivf_vectors(index: ItemIndex) -> np.ndarray:
    ivf = faiss.extract_index_ivf(index.index)
    ivf.make_direct_map()
    try:
        return ivf.reconstruct_n(0, index.size)
    finally:
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)


# --- Save / load -------------------------------------------------------------------------
def save_index(path: str | Path, index: ItemIndex, metadata: Mapping[str, Any]) -> Path:
    """Write ``index`` into the folder ``path`` atomically (index, id map, metadata).

    ``metadata`` must name the checkpoint the vectors came from (``checkpoint_version``, e.g.
    the checkpoint asset's data version); anything else JSON-serializable is kept as is.
    """
    if not metadata.get("checkpoint_version"):
        raise RetrievalError("save_index needs metadata['checkpoint_version'] (the checkpoint's data version)")
    meta = {
        **index.metadata,
        **dict(metadata),
        "format_version": FORMAT_VERSION,
        "spec": index.spec.to_json(),
        "dim": index.dim,
        "pool_size": index.size,
        "pool_fingerprint": pool_fingerprint(index.ids),
        "faiss_version": faiss.__version__,
    }
    path = Path(path)
    with atomic_dir(path) as tmp:
        faiss.write_index(index.index, str(tmp / INDEX_FILE))
        np.save(tmp / IDS_FILE, index.ids)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    index.metadata = meta
    return path


_FLAT_FOURCCS = (b"IxFI", b"IxF2", b"IxFl")


class _IndexFileWalk:
    """Reads an index file's header fields and steps over its arrays, refusing any part that runs
    past the end of the file (the layout: faiss/impl/index_read.cpp, read_index)."""

    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self.handle, self.path, self.left = handle, path, path.stat().st_size

    def _refuse(self, expected: str, found: str) -> IndexMismatchError:
        return IndexMismatchError(
            f"{self.path}: expected {expected}; found {found}: the file is damaged or not one save_index wrote; "
            "rebuild the index"
        )

    def _claim(self, size: int, what: str) -> None:
        if size > self.left:
            found = f"{what} of {size:,} bytes where {self.left:,} are left"
            raise self._refuse("a faiss index whose parts fit in the file", found)
        self.left -= size

    def read(self, size: int, what: str) -> bytes:
        self._claim(size, what)
        return self.handle.read(size)

    def fields(self, layout: str, what: str) -> tuple[Any, ...]:
        return struct.unpack("<" + layout, self.read(struct.calcsize("<" + layout), what))

    def array(self, item_size: int, what: str) -> int:
        """Step over a faiss vector (its item count, uint64, then its items); its item count."""
        (count,) = self.fields("Q", what)
        self._claim(count * item_size, what)
        self.handle.seek(count * item_size, os.SEEK_CUR)
        return count

    def index(self, kinds: tuple[bytes, ...] = (*_FLAT_FOURCCS, b"IHNf", b"IwFl")) -> int:
        """Walk one index of a kind build_index writes (flat; HNSW or IVF over flat); its ntotal."""
        (fourcc,) = self.fields("4s", "index type")
        if fourcc not in kinds:
            raise self._refuse(f"a faiss index of type {' or '.join(k.decode() for k in kinds)}", f"type {fourcc!r}")
        d, ntotal, _, _, _, metric = self.fields("iqqq?i", "index header")  # 2 dummies, is_trained
        if metric > 1:
            self.fields("f", "metric argument")
        if fourcc in _FLAT_FOURCCS:
            floats = self.array(4, "vectors")
            if d < 1 or floats != ntotal * d:  # faiss checks this after reading; IVF needs it before
                raise self._refuse(f"{ntotal:,} vectors of dimension {d}", f"{floats:,} floats")
        elif fourcc == b"IHNf":
            for item_size, what in ((8, "level probabilities"), (4, "neighbours per level"), (4, "levels"),
                                    (8, "offsets"), (4, "neighbours")):
                self.array(item_size, f"HNSW {what}")
            self.fields("5i", "HNSW parameters")
            self.index(_FLAT_FOURCCS)  # the vectors
        else:  # IVF-flat
            nlist, _ = self.fields("QQ", "IVF header")
            self.inverted_lists(nlist, centroids=self.index(_FLAT_FOURCCS))
        return ntotal

    def inverted_lists(self, nlist: int, centroids: int) -> None:
        (direct_map,) = self.fields("b", "IVF direct map")
        self.array(8, "IVF direct map")
        if direct_map == 2:  # a hash table: (id, offset) pairs
            self.array(16, "IVF direct map")
        fourcc, lists, code_size, layout = self.fields("4sQQ4s", "IVF lists header")
        # faiss makes a table per list before it reads any: the lists must be the centroids'
        if fourcc != b"ilar" or not lists == nlist <= centroids or layout not in (b"full", b"sprs"):
            found = f"{fourcc!r} {layout!r} with {lists:,} lists"
            raise self._refuse(f"IVF lists ('ilar'), one per centroid ({centroids:,})", found)
        (count,) = self.fields("Q", "IVF list sizes")
        sizes = np.frombuffer(self.read(8 * count, "IVF list sizes"), dtype=np.uint64)
        if layout == b"sprs":  # (list, size) pairs for the lists that are not empty
            sizes = sizes[1::2]
        self._claim(sum(int(size) for size in sizes) * (code_size + 8), "IVF lists (codes and ids)")


def check_index_file(path: Path) -> None:
    """Refuse an index file whose header declares more data than the file holds: faiss sizes its
    arrays from the header before reading them, so a 365-byte file could make it allocate 1 GB."""
    with open(path, "rb") as handle:
        _IndexFileWalk(handle, path).index()


def read_index_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise IndexMismatchError(f"{path}: no saved index here ({METADATA_FILE} is missing)")
    return json.loads(meta_path.read_text())


def load_index(
    path: str | Path,
    *,
    expected_checkpoint_version: str | None = None,
    expected: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> ItemIndex:
    """Read a folder written by ``save_index`` and check that its parts agree.

    Refuses (``IndexMismatchError``) an index built from another checkpoint than
    ``expected_checkpoint_version``, and one whose metadata differs from ``expected`` on any
    of its keys (e.g. ``{"dim": 64, "pool_fingerprint": pool_fingerprint(candidate ids)}``).
    """
    path = Path(path)
    meta = read_index_metadata(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise IndexMismatchError(f"{path}: index format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    if expected_checkpoint_version is not None and meta.get("checkpoint_version") != expected_checkpoint_version:
        raise IndexMismatchError(
            f"{path}: the index was built from checkpoint {meta.get('checkpoint_version')!r}, not the current "
            f"checkpoint {expected_checkpoint_version!r}; rebuild the index"
        )
    for key, want in (expected or {}).items():
        if meta.get(key) != want:
            raise IndexMismatchError(
                f"{path}: index metadata {key}={meta.get(key)!r}, expected {want!r}; rebuild the index"
            )
    set_threads(threads)
    check_index_file(path / INDEX_FILE)
    raw = faiss.read_index(str(path / INDEX_FILE))
    ids = np.load(path / IDS_FILE)
    spec = IndexSpec.from_json(meta["spec"])
    problems = []
    if raw.d != meta.get("dim"):
        problems.append(f"faiss dim {raw.d} vs metadata dim {meta.get('dim')}")
    if raw.ntotal != meta.get("pool_size") or len(ids) != meta.get("pool_size"):
        problems.append(f"{raw.ntotal} vectors and {len(ids)} ids vs metadata pool size {meta.get('pool_size')}")
    if pool_fingerprint(ids) != meta.get("pool_fingerprint"):
        problems.append("the id map's fingerprint differs from the metadata's")
    kind = "ivf" if faiss.try_extract_index_ivf(raw) is not None else "hnsw" if hasattr(raw, "hnsw") else "flat"
    if kind != spec.kind:
        problems.append(f"faiss index type {type(raw).__name__} vs spec kind {spec.kind!r}")
    if problems:
        raise IndexMismatchError(f"{path}: the saved index is inconsistent: " + "; ".join(problems))
    return ItemIndex(index=raw, ids=ids, spec=spec, metadata=meta)


__all__ = [
    "FLAT_MAX_POOL",
    "ExclusionCSR",
    "IndexMismatchError",
    "IndexSpec",
    "ItemIndex",
    "RetrievalError",
    "allowed_params",
    "as_csr",
    "auto_nlist",
    "batch_exclusions",
    "build_index",
    "default_index_spec",
    "default_nprobe",
    "filter_topk",
    "flat_like",
    "load_index",
    "measure_recall",
    "normalize_rows",
    "pool_fingerprint",
    "read_index_metadata",
    "recall_at_k",
    "save_index",
    "search",
    "set_threads",
    "torch_exact_search",
    "torch_index",
    "tune_ef_search",
    "tune_nprobe",
]
