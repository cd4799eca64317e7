"""Top-k retrieval over the candidate pool with Faiss (inner product on L2-normalized vectors).

    item vectors  --normalize-->  IndexFlatIP | IndexIVFFlat | IndexHNSWFlat   (rows 0..n-1)
    user vectors  --normalize-->  search(k + max exclusions)  --drop history items-->  top-k
    row -> id through the index's id map (creative ids, or retrieval ids: the caller's choice)

This module builds the index and searches it. Beside it: which index to build
(models/index_spec.py), the history exclusions (models/exclusions.py), recall and the tuning
of nprobe / efSearch (models/index_tuning.py), the saved folder (models/index_files.py).

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
* faiss's bundled type stub lacks parts of its Python wrappers (the search parameters' keyword
  constructors, ``SearchParametersHNSW``, ``DirectMap``, the wrapped ``search_preassigned``):
  those are reached through ``Any``.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import faiss
import numpy as np

from models.exclusions import Exclusions, as_csr, batch_exclusions, filter_topk
from models.index_spec import MIN_POINTS_PER_LIST, TRAIN_POINTS_PER_LIST, IndexSpec, auto_nlist, default_index_spec
from models.retrieval_errors import IndexMismatchError, RetrievalError

if TYPE_CHECKING:
    from models.torch_search import TorchExactIndex


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


def _hnsw(index: faiss.Index) -> faiss.HNSW:
    return cast(faiss.IndexHNSW, index).hnsw


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
            _hnsw(self.index).efSearch = spec.ef_search
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


# --- Build -------------------------------------------------------------------------------
def _check_items(vectors: np.ndarray, ids: np.ndarray) -> None:
    """Refuse item vectors that are not [n, dim] with n, dim > 0, or ids that are not n unique integers."""
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


def _ivf_index(x: np.ndarray, spec: IndexSpec, seed: int) -> tuple[faiss.Index, IndexSpec]:
    """IVF-Flat over the normalized rows ``x``, trained on a seeded sample; the spec with the nlist used."""
    n, dim = x.shape
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
    return index, spec


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
    _check_items(vectors, ids)
    n, dim = vectors.shape
    spec = spec or default_index_spec(n)
    set_threads(threads)
    x = normalize_rows(vectors, what="item vectors", normalize=spec.normalize)
    started = time.perf_counter()

    if spec.kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
        index.add(x)
    elif spec.kind == "ivf":
        index, spec = _ivf_index(x, spec, seed)
    else:  # hnsw
        index = faiss.IndexHNSWFlat(dim, spec.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        index.add(x)  # multi-threaded insertion: two builds may differ slightly
    built = ItemIndex(index=index, ids=ids.astype(np.int64), spec=spec)
    built.metadata.update({"build_seconds": round(time.perf_counter() - started, 3), "seed": int(seed)})
    return built


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
        ivf.set_direct_map_type(cast(Any, faiss).DirectMap.NoMap)


# --- Search ------------------------------------------------------------------------------
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
    wrappers = cast(Any, faiss)  # the keyword constructors (see the module docstring)
    if index.spec.kind == "ivf":
        params = wrappers.SearchParametersIVF(sel=selector, nprobe=faiss.extract_index_ivf(index.index).nprobe)
    elif index.spec.kind == "hnsw":
        params = wrappers.SearchParametersHNSW(sel=selector, efSearch=_hnsw(index.index).efSearch)
    else:
        params = wrappers.SearchParameters(sel=selector)
    return params, (bits, selector)


def _faiss_search(index: ItemIndex, q: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``index.index.search``; for IVF, queries are first sorted by their nearest list so that
    neighbouring queries (one thread's share) scan the same lists while they are in cache:
    the scan is memory-bound, and this saves ~30% at 660K x 64-d. Same results. ``params``:
    ``allowed_params``'s (Faiss's ``search_preassigned`` takes none, so the lists are then
    assigned twice: once to sort, once in the search)."""
    if index.spec.kind != "ivf" or len(q) < 256:
        return index.index.search(q, k, params=params) if params is not None else index.index.search(q, k)
    ivf: Any = faiss.extract_index_ivf(index.index)  # the wrapped search_preassigned (see the module docstring)
    coarse_scores, lists = ivf.quantizer.search(q, ivf.nprobe)
    order = np.argsort(lists[:, 0], kind="stable")
    if params is not None:
        scores, labels = index.index.search(q[order], k, params=params)
    else:
        scores, labels = ivf.search_preassigned(q[order], k, lists[order], coarse_scores[order])
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return scores[inverse], labels[inverse]


def _check_queries(index: ItemIndex, queries: np.ndarray, k: int) -> None:
    if queries.ndim != 2:
        raise RetrievalError(f"queries must be a 2-d [nq, dim] array, got shape {queries.shape}")
    if queries.shape[1] != index.dim:
        raise RetrievalError(
            f"query dimension {queries.shape[1]} does not match the index dimension {index.dim} "
            "(was the index built from another checkpoint?)"
        )
    if k < 1:
        raise RetrievalError(f"k must be >= 1, got {k}")


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
    _check_queries(index, queries, k)
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


# --- Exact search with torch -------------------------------------------------------------
def torch_index(
    index: ItemIndex | np.ndarray, device: str = "cuda", *, max_score_bytes: int | None = None
) -> TorchExactIndex:
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
    index: TorchExactIndex | ItemIndex | np.ndarray,
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


__all__ = [
    "ItemIndex",
    "allowed_params",
    "build_index",
    "default_threads",
    "flat_like",
    "normalize_rows",
    "pool_fingerprint",
    "search",
    "set_threads",
    "torch_exact_search",
    "torch_index",
]
