"""Semantic IDs: residual k-means (RQ-KMeans) codebooks over item vectors: one multi-modal
embedding family (content), or collaborative vectors learned from the training sequences.

An item's Semantic ID is a short tuple of codes. Level 1 is the nearest of K centroids to the
item's (normalized, optionally whitened) embedding; level l + 1 quantizes what level l left
over (the residual). Similar items share a prefix, so a generative model can decode an item
coarse to fine.

    x' = whiten(normalize(x))            optional L2 normalization, optional PCA whitening
    r_0 = x';  c_l = argmin_k |r_l - C_l[k]|;  r_{l+1} = r_l - C_l[c_l]      for l < levels

Decisions (docs/semantic_ids.md says the same):

* **Collisions** are resolved with an extra *disambiguation level*: items that share their
  whole RQ tuple are ranked inside the group (embedded items first, nearest to the group's
  reconstruction first, then by creative id) and the rank is appended as the last code, so
  the first item of a tuple gets 0. Every item then has a unique tuple, nothing is moved
  away from its nearest centroid, and the last level's vocabulary is the largest group
  (reported as ``max_disambiguation``). Reassigning to the next-nearest free centroid was
  rejected: it distorts the codes of exactly the dense regions that matter and cannot
  guarantee uniqueness without a fallback level anyway.
* **Items without an embedding** (the family's coverage is partial) are encoded from the mean
  embedding of the embedded items that share their advertiser (sparse feature ``102``), run
  through the same normalization, whitening and codebooks, so they land near their
  advertiser's items. Items without such an advertiser get the reserved *unknown* code K at
  every level. Both then go through the disambiguation level, so tuples stay unique.
* **Which vectors** (setting ``source``): ``content`` quantizes a family's embeddings;
  ``collaborative`` quantizes vectors learned from the ``sequences`` table
  (``models/collaborative.py``: SVD of the PPMI of item co-occurrence), for data with no family
  or too little coverage; ``auto`` (the default) takes content when the family covers at least
  ``min_items`` items and collaborative otherwise, so a real dataset whatever its families
  never stops here. The choice is recorded as ``source`` (``content:81`` or ``collaborative``)
  with the content coverage in ``codebooks.json``. The fallback below is the same for both.
* Determinism: the training subsample and faiss's k-means initialisation depend on ``seed``
  only; assignment is exact (``IndexFlatL2``). Same input and config, same codes.

The first part of the file is plain numpy + faiss (fit, encode, metrics); the last part,
``build_semantic_ids``, reads one track's warehouse and writes the codebooks and the
``item_semantic_ids`` table. Nothing here imports Dagster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from models.collaborative import CollaborativeConfig, collaborative_vectors
from taac_dagster.errors import TaacError
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import TaacSettings
from taac_dagster.tracks import get_track

log = logging.getLogger(__name__)

FALLBACK_FEATURE = "102"  # the advertiser: items without an embedding borrow its mean embedding
CODEBOOKS_NPZ = "codebooks.npz"
CODEBOOKS_JSON = "codebooks.json"
INFO_TABLE = "item_semantic_ids_info"  # the codebooks' JSON, committed with the codes
TABLE = "item_semantic_ids"
_CHUNK_VALUES = 1 << 24  # rows per encoding chunk = this / dim (64 MiB of float32)
_SINGLE_THREAD_WORK = 1 << 27  # n * K * d below this: one faiss thread (threads cost more)


class SemanticIdInputError(TaacError):
    """The embeddings cannot support Semantic IDs: family missing, or too few items have it."""


@dataclass
class SemanticIdConfig:
    levels: int = 3
    codebook_size: int = 256  # K per level (capped at the number of training points)
    whiten: Literal["none", "pca"] = "none"
    whiten_dim: int | None = None  # PCA output dim; None = min(input dim, 256)
    niter: int = 20  # k-means iterations per level
    seed: int = 0
    max_train_points: int = 100_000  # deterministic subsample used to fit PCA and k-means
    normalize: bool = True  # L2-normalize the embeddings first (cosine geometry)

    def __post_init__(self) -> None:
        if self.levels < 1 or self.codebook_size < 1 or self.niter < 1 or self.max_train_points < 1:
            raise ValueError(f"levels, codebook_size, niter and max_train_points must be >= 1: {self}")
        if self.whiten not in ("none", "pca"):
            raise ValueError(f"whiten must be 'none' or 'pca', got {self.whiten!r}")


@dataclass
class RQCodebooks:
    """Everything needed to encode a new vector: the preprocessing and the centroids."""

    centroids: np.ndarray  # float32 [levels, K, d']
    mean: np.ndarray | None  # float32 [d]: subtracted before the projection (PCA only)
    projection: np.ndarray | None  # float32 [d, d']: PCA whitening; None = identity
    normalize: bool
    input_dim: int
    config: SemanticIdConfig = field(default_factory=SemanticIdConfig)

    @property
    def levels(self) -> int:
        return self.centroids.shape[0]

    @property
    def codebook_size(self) -> int:
        return self.centroids.shape[1]

    @property
    def dim(self) -> int:
        return self.centroids.shape[2]

    @property
    def unknown_code(self) -> int:
        """The reserved code of items that could not be encoded (K, one past the centroids)."""
        return self.codebook_size

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """normalize + whiten: the space the codebooks quantize (a new float32 array)."""
        x = _normalized_copy(vectors, self.normalize, self.input_dim)
        if self.projection is not None:
            x -= self.mean
            x = x @ self.projection
        return np.ascontiguousarray(x, dtype=np.float32)

    def save(self, folder: Path, metadata: dict[str, Any] | None = None) -> None:
        """``codebooks.npz`` (arrays) and ``codebooks.json`` (config + metadata) in ``folder``."""
        empty = np.zeros((0,), np.float32)
        np.savez(
            folder / CODEBOOKS_NPZ,
            centroids=self.centroids,
            mean=self.mean if self.mean is not None else empty,
            projection=self.projection if self.projection is not None else empty,
        )
        info = {
            "levels": self.levels,
            "codebook_size": self.codebook_size,
            "unknown_code": self.unknown_code,
            "input_dim": self.input_dim,
            "dim": self.dim,
            "normalize": self.normalize,
            "config": asdict(self.config),
            **(metadata or {}),
        }
        (folder / CODEBOOKS_JSON).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")

    @classmethod
    def load(cls, folder: Path) -> RQCodebooks:
        info = json.loads((Path(folder) / CODEBOOKS_JSON).read_text())
        with np.load(Path(folder) / CODEBOOKS_NPZ) as arrays:
            mean, projection = arrays["mean"], arrays["projection"]
            return cls(
                centroids=arrays["centroids"],
                mean=mean if mean.size else None,
                projection=projection if projection.size else None,
                normalize=bool(info["normalize"]),
                input_dim=int(info["input_dim"]),
                config=SemanticIdConfig(**info["config"]),
            )


# --- Fit --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _faiss_threads(work: int):
    """One OpenMP thread for small problems: on a busy machine, waking the thread pool for a
    few-millisecond k-means step costs ~50x the work itself."""
    if work >= _SINGLE_THREAD_WORK:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _normalized_copy(vectors: np.ndarray, normalize: bool, dim: int, copy: bool = True) -> np.ndarray:
    """float32 2-d, L2-normalized rows if asked; ``copy=False`` may normalize ``vectors`` in place."""
    x = np.array(vectors, dtype=np.float32, copy=True, ndmin=2) if copy else np.asarray(vectors, np.float32)
    if x.shape[1] != dim:
        raise ValueError(f"expected vectors of dim {dim}, got {x.shape[1]}")
    sq_norms = np.einsum("ij,ij->i", x, x)  # no n x d temporary, unlike np.linalg.norm
    if not np.isfinite(sq_norms).all():
        raise ValueError("embeddings contain NaN or infinite values")
    if normalize:
        x /= np.maximum(np.sqrt(sq_norms), 1e-12)[:, None]
    return x


def training_sample(n: int, cfg: SemanticIdConfig) -> np.ndarray:
    """Sorted row indices of the deterministic training subsample (all rows when n is small)."""
    if n <= cfg.max_train_points:
        return np.arange(n)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1]))
    return np.sort(rng.choice(n, size=cfg.max_train_points, replace=False))


def _fit_pca_whitening(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and projection [d, dim] so that (x - mean) @ P has identity covariance."""
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    xc = x - mean
    cov = (xc.T @ xc).astype(np.float64) / max(len(x) - 1, 1)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    order = np.argsort(eigval)[::-1][:dim]
    eigval = np.maximum(eigval[order], 1e-6 * max(float(eigval.max()), 1e-30))
    projection = eigvec[:, order] / np.sqrt(eigval)  # eigen_power = -0.5
    return mean, projection.astype(np.float32)


def _subtract_assigned(residual: np.ndarray, centroids: np.ndarray, assigned: np.ndarray) -> None:
    """residual -= centroids[assigned], in row chunks (no full-size temporary)."""
    chunk = max(1, _CHUNK_VALUES // max(residual.shape[1], 1))
    for lo in range(0, len(residual), chunk):
        residual[lo : lo + chunk] -= centroids[assigned[lo : lo + chunk]]


def _kmeans(x: np.ndarray, k: int, cfg: SemanticIdConfig, level: int) -> np.ndarray:
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=cfg.niter,
        seed=(cfg.seed * 1000 + level + 1) % (2**31 - 1),  # faiss takes a C int
        verbose=False,
        min_points_per_centroid=1,  # we cap K ourselves; no "please provide more points" noise
        max_points_per_centroid=len(x) // k + 1,  # we subsample ourselves; faiss must not
    )
    with _faiss_threads(len(x) * k * x.shape[1]):
        km.train(x)
    return km.centroids.astype(np.float32, copy=False)


def fit_rq_kmeans(
    vectors: np.ndarray, cfg: SemanticIdConfig | None = None, *, logger: Any = None, overwrite_input: bool = False
) -> RQCodebooks:
    """Fit the whitening (if any) and ``cfg.levels`` residual k-means codebooks.

    ``vectors``: float32 [n, d]. Trains on a deterministic subsample of at most
    ``cfg.max_train_points`` rows. K is capped at the number of training points (warned).
    ``overwrite_input``: ``vectors`` may be used as scratch space (saves a copy of the
    training set: 1.6 GB at 100K x 4096-d); its contents are undefined afterwards.
    """
    cfg = cfg or SemanticIdConfig()
    logger = logger or log
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"expected a non-empty [n, d] matrix, got shape {vectors.shape}")
    n, d = vectors.shape
    sample = training_sample(n, cfg)
    if len(sample) == n:
        x = _normalized_copy(vectors, cfg.normalize, d, copy=not overwrite_input)
    else:
        x = _normalized_copy(vectors[sample], cfg.normalize, d, copy=False)  # indexing made a copy

    mean = projection = None
    if cfg.whiten == "pca":
        out_dim = min(cfg.whiten_dim or 256, d)
        started = time.perf_counter()
        mean, projection = _fit_pca_whitening(x, out_dim)
        x = np.ascontiguousarray((x - mean) @ projection, dtype=np.float32)
        logger.info(f"PCA whitening {d} -> {out_dim} dims in {time.perf_counter() - started:.1f}s")

    k = cfg.codebook_size
    if k > len(x):
        message = (
            f"codebook size {k} is larger than the {len(x)} training points: using K = {len(x)}"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        logger.warning(message)
        k = len(x)

    centroids = np.empty((cfg.levels, k, x.shape[1]), np.float32)
    residual = x
    for level in range(cfg.levels):
        started = time.perf_counter()
        centroids[level] = _kmeans(residual, k, cfg, level)
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(centroids[level])
        with _faiss_threads(len(x) * k * x.shape[1]):
            _, assigned = index.search(residual, 1)
        _subtract_assigned(residual, centroids[level], assigned[:, 0])  # in place: x is ours
        logger.info(
            f"level {level + 1}/{cfg.levels}: k-means K={k} on {len(x)} x {x.shape[1]} "
            f"in {time.perf_counter() - started:.1f}s"
        )
    return RQCodebooks(centroids, mean, projection, cfg.normalize, d, cfg)


# --- Encode -----------------------------------------------------------------------------------
@dataclass
class Encoded:
    codes: np.ndarray  # int32 [n, levels]
    level_sq_error: np.ndarray  # float32 [n, levels]: |residual|^2 after each level
    sq_norm: np.ndarray  # float32 [n]: |x'|^2 of the transformed input


def encode_with_errors(codebooks: RQCodebooks, vectors: np.ndarray) -> Encoded:
    """Codes plus the squared residual after each level, in row chunks (bounded memory)."""
    vectors = np.asarray(vectors)
    n = len(vectors)
    levels = codebooks.levels
    codes = np.empty((n, levels), np.int32)
    errors = np.empty((n, levels), np.float32)
    sq_norm = np.empty(n, np.float32)
    indexes = []
    for level in range(levels):
        index = faiss.IndexFlatL2(codebooks.dim)
        index.add(np.ascontiguousarray(codebooks.centroids[level]))
        indexes.append(index)
    chunk = max(1, _CHUNK_VALUES // max(codebooks.input_dim, 1))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        residual = codebooks.transform(vectors[lo:hi])
        sq_norm[lo:hi] = np.einsum("ij,ij->i", residual, residual)
        for level, index in enumerate(indexes):
            with _faiss_threads((hi - lo) * codebooks.codebook_size * codebooks.dim):
                _, assigned = index.search(residual, 1)
            codes[lo:hi, level] = assigned[:, 0]
            residual -= codebooks.centroids[level][assigned[:, 0]]
            errors[lo:hi, level] = np.einsum("ij,ij->i", residual, residual)
    return Encoded(codes, errors, sq_norm)


def encode(codebooks: RQCodebooks, vectors: np.ndarray) -> np.ndarray:
    """int32 codes [n, levels]: the nearest centroid of each level on the running residual."""
    return encode_with_errors(codebooks, vectors).codes


def decode(codebooks: RQCodebooks, codes: np.ndarray) -> np.ndarray:
    """The reconstruction (sum of the chosen centroids) in the transformed space."""
    codes = np.asarray(codes)
    out = np.zeros((len(codes), codebooks.dim), np.float32)
    for level in range(codes.shape[1]):
        out += codebooks.centroids[level][codes[:, level]]
    return out


# --- Metrics ----------------------------------------------------------------------------------
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


def _group_ids(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group id per row, size of each group) for identical code tuples."""
    codes = np.ascontiguousarray(codes)
    if len(codes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    radix = [int(m) + 1 for m in codes.max(axis=0)]
    if codes.min() >= 0 and math.prod(radix) < 2**63:
        # Mixed-radix packing into one int64: sorting a 1-d key is ~30x faster than axis=0.
        key = np.zeros(len(codes), np.int64)
        for column, base in enumerate(radix):
            key = key * base + codes[:, column]
        _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    else:
        _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def collision_rate(codes: np.ndarray) -> float:
    """Share of items whose code tuple is shared with at least one other item."""
    if len(codes) == 0:
        return 0.0
    inverse, counts = _group_ids(codes)
    return float((counts[inverse] > 1).mean())


def resolve_collisions(
    codes: np.ndarray, priority: np.ndarray | None = None, ids: np.ndarray | None = None
) -> np.ndarray:
    """The disambiguation code of each row: its rank inside its group of identical tuples.

    Rows are ranked by ``priority`` ascending (e.g. the squared distance to the tuple's
    reconstruction; ``inf`` for items without an embedding), then ``ids`` ascending, then
    the row order. The first row of every tuple gets 0, so ``codes + [rank]`` is unique.
    """
    codes = np.ascontiguousarray(codes)
    n = len(codes)
    if n == 0:
        return np.zeros(0, np.int32)
    group, _ = _group_ids(codes)
    keys = [np.arange(n)]
    if ids is not None:
        keys.insert(0, np.asarray(ids))
    if priority is not None:
        keys.insert(0, np.asarray(priority, dtype=np.float64))
    order = np.lexsort((*keys[::-1], group))  # last key is primary: group, then priority, ids
    sorted_group = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    rank = np.empty(n, np.int32)
    rank[order] = np.arange(n) - run_start
    return rank


class GroupMeans:
    """Running per-group sums of embeddings, for the groups (advertisers) of ``wanted_keys``.

    Fed batch by batch (``add``), so the embeddings never need to be in memory at once; the
    sums take groups x dim float32.
    """

    def __init__(self, wanted_keys: np.ndarray, dim: int) -> None:
        keys = np.asarray(wanted_keys, np.int64)
        self.keys = np.unique(keys[keys > 0])
        self.sums = np.zeros((len(self.keys), dim), np.float32)
        self.counts = np.zeros(len(self.keys), np.int64)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        position, found = _lookup(self.keys, np.asarray(keys, np.int64))
        if not found.any():
            return
        rows = np.flatnonzero(found)
        rows = rows[np.argsort(position[rows], kind="stable")]
        position = position[rows]
        starts = np.flatnonzero(np.r_[True, position[1:] != position[:-1]])
        partial = np.add.reduceat(np.asarray(vectors[rows], np.float32), starts, axis=0, dtype=np.float64)
        self.sums[position[starts]] += partial.astype(np.float32)
        self.counts[position[starts]] += np.diff(np.r_[starts, len(rows)])

    def codes(self, codebooks: RQCodebooks, keys: np.ndarray) -> np.ndarray:
        """Codes of each key's mean embedding; the unknown code where the group is empty."""
        keys = np.asarray(keys, np.int64)
        out = np.full((len(keys), codebooks.levels), codebooks.unknown_code, np.int32)
        have = np.flatnonzero(self.counts > 0)
        group_codes = np.empty((len(have), codebooks.levels), np.int32)
        chunk = max(1, _CHUNK_VALUES // max(codebooks.input_dim, 1))
        for lo in range(0, len(have), chunk):
            part = have[lo : lo + chunk]
            group_codes[lo : lo + chunk] = encode(codebooks, self.sums[part] / self.counts[part, None])
        position, found = _lookup(self.keys[have], keys)
        out[found] = group_codes[position[found]]
        return out


def fallback_codes(
    codebooks: RQCodebooks,
    missing_keys: np.ndarray,
    known_keys: np.ndarray,
    known_vectors: np.ndarray,
) -> np.ndarray:
    """Codes for items without an embedding, from their group's (advertiser's) mean embedding.

    ``missing_keys``: int64 group key of each item without an embedding (<= 0 = none);
    ``known_keys`` / ``known_vectors``: key and embedding of each embedded item. An item whose
    key no embedded item shares gets ``codebooks.unknown_code`` at every level.
    """
    means = GroupMeans(missing_keys, codebooks.input_dim)
    chunk = max(1, _CHUNK_VALUES // max(codebooks.input_dim, 1))
    for lo in range(0, len(known_keys), chunk):
        means.add(known_keys[lo : lo + chunk], known_vectors[lo : lo + chunk])
    return means.codes(codebooks, missing_keys)


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


def auto_codebook_size(n_items: int, cap: int = 256) -> int:
    """K for small catalogues: min(cap, max(8, round(sqrt(n)))); 256 for >= 65,536 items."""
    return int(min(cap, max(8, round(math.sqrt(max(n_items, 0))))))


# --- One track: warehouse in, codebooks + item_semantic_ids out -------------------------------
@dataclass
class ContentCoverage:
    """How many items the content family covers, and whether that is enough for Semantic IDs."""

    family: int | None  # None: the warehouse holds no family
    items: int  # items and candidates to code
    items_with_content: int  # of them, those with the family's embedding
    min_items: int  # the least that supports content codes

    @property
    def share(self) -> float:
        return self.items_with_content / self.items if self.items else 0.0

    @property
    def sufficient(self) -> bool:
        return self.family is not None and self.items_with_content >= max(self.min_items, 1)

    def to_metadata(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "items": self.items,
            "items_with_content": self.items_with_content,
            "share": round(self.share, 4),
            "min_items": self.min_items,
            "sufficient": self.sufficient,
        }


@dataclass
class SemanticIdResult:
    source: str  # what was quantized: "content:<family>" or "collaborative"
    family: int | None  # the family quantized (None: collaborative vectors)
    dim: int
    codebooks: RQCodebooks
    codes: np.ndarray  # int32 [n, levels + 1] (last column: disambiguation)
    creative_ids: np.ndarray
    has_embedding: np.ndarray  # a vector of the source used (else the advertiser / unknown fallback)
    metrics: dict[str, Any]
    codebooks_dir: Path
    warehouse: Path
    seconds: dict[str, float]
    coverage: ContentCoverage

    def to_metadata(self) -> dict[str, Any]:
        return {
            **self.metrics,
            "source": self.source,
            "family": self.family,
            "dim": self.dim,
            "codebooks_dir": str(self.codebooks_dir),
            "warehouse": str(self.warehouse),
            "table": TABLE,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


def _read_inputs(paths: Any, settings: Any) -> tuple[list[tuple], dict[str, np.ndarray]]:
    from taac_dagster.warehouse import connect_warehouse

    if not paths.warehouse.is_file():
        raise SemanticIdInputError(
            f"{paths.warehouse} is missing: materialize the warehouse tables of track {paths.track} first"
        )
    con = connect_warehouse(paths.warehouse, settings, read_only=True)
    try:
        tables = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if "embedding_families" not in tables:
            raise SemanticIdInputError(
                f"{paths.warehouse} has no embedding_families table: re-materialize the warehouse of track {paths.track}"
            )
        families = con.execute("SELECT family, dim, path, indexed_items, item_coverage FROM embedding_families").fetchall()
        feature = f"f{FALLBACK_FEATURE}"
        item_cols = {r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'items'").fetchall()}
        cand_cols = {
            r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'candidates'").fetchall()
        }
        item_feature = f"i.{feature}" if feature in item_cols else "NULL"
        cand_feature = f"c.{feature}" if feature in cand_cols else "NULL"
        rows = con.execute(
            f"""
            WITH i AS (SELECT * FROM items WHERE creative_id IS NOT NULL),
            universe AS (
                SELECT i.creative_id, i.item_id, {item_feature} AS group_key, true AS in_items FROM i
                UNION ALL
                SELECT c.creative_id, c.item_id, {cand_feature} AS group_key, false AS in_items
                FROM candidates c WHERE c.creative_id IS NOT NULL
            )
            SELECT creative_id,
                   coalesce(min(item_id) FILTER (WHERE in_items), min(item_id)) AS item_id,
                   coalesce(min(group_key) FILTER (WHERE in_items), min(group_key)) AS group_key
            FROM universe GROUP BY creative_id ORDER BY creative_id
            """
        ).fetchall()
        dropped = con.execute("SELECT count(*) FROM items WHERE creative_id IS NULL").fetchall()[0][0]
    finally:
        con.close()
    universe = {
        "creative_id": np.array([r[0] for r in rows], np.int64),
        "item_id": np.array([-1 if r[1] is None else r[1] for r in rows], np.int64),
        "group_key": np.array([0 if r[2] is None else r[2] for r in rows], np.int64),
        "items_without_creative_id": np.array([dropped]),
    }
    return families, universe


def _choose_family(families: list[tuple], wanted: int | None, configured: list[int] | None, track: str) -> tuple | None:
    """The warehouse row of the family to quantize: ``wanted``, else the first configured family,
    else (families on auto) the lowest family the warehouse holds; None when it holds none and
    none was asked for. A family asked for but not built is an error."""
    built = {int(f[0]): f for f in families}
    if wanted is None and not configured:
        return built[min(built)] if built else None
    family = wanted if wanted is not None else configured[0]
    if family not in built:
        have = ", ".join(str(f) for f in sorted(built)) or "none"
        raise SemanticIdInputError(
            f"embedding family {family} is not in the warehouse of track {track} (families built: {have}). "
            f"Either set TAAC_SEMANTIC_IDS__FAMILY to one of them, or add {family} to TAAC_EMBEDDING_FAMILIES "
            "and re-materialize raw_dataset and the warehouse tables."
        )
    return built[family]


def choose_source(setting: str, coverage: ContentCoverage, track: str) -> str:
    """"content" or "collaborative" for the ``source`` setting (auto | content | collaborative):
    auto takes content when its coverage suffices; content without it is an error."""
    if setting == "collaborative":
        return "collaborative"
    if coverage.sufficient:
        return "content"
    if setting == "auto":
        return "collaborative"
    if coverage.family is None:
        raise SemanticIdInputError(
            f"the warehouse of track {track} holds no embedding family, and TAAC_SEMANTIC_IDS__SOURCE is "
            "'content'. Set it to auto or collaborative (codes from the training sequences), or add a "
            "family (TAAC_EMBEDDING_FAMILIES) and re-materialize raw_dataset and the warehouse tables."
        )
    raise SemanticIdInputError(
        f"embedding family {coverage.family} covers only {coverage.items_with_content} of the {coverage.items} "
        f"items and candidates of track {track}; Semantic IDs need at least {coverage.min_items}. Choose a "
        "family with more coverage (TAAC_SEMANTIC_IDS__FAMILY), lower TAAC_SEMANTIC_IDS__MIN_ITEMS / "
        "TAAC_SEMANTIC_IDS__CODEBOOK_SIZE, set TAAC_SEMANTIC_IDS__SOURCE=auto to fall back to collaborative "
        "vectors, or check the family's source files."
    )


def sequence_batches(warehouse: Path, settings: Any, target_priority: tuple[int, ...], users_per_batch: int = 20_000):
    """The ``sequences`` table's item lists as (flat item ids, lengths) batches of users.

    A holdout user's sequence is cut before its own last target (by the holdout's rule: the
    last event of the first action type of ``target_priority`` present): training may validate
    on that target (models/data.py), so codes learned from co-occurrence must not have seen it.
    The test target is never in ``sequences`` in the first place."""
    from taac_dagster.warehouse import connect_warehouse

    last = ", ".join(f"len(action_types) + 1 - list_position(list_reverse(action_types), {a})" for a in target_priority)
    query = f"""
        SELECT CASE WHEN h.user_id IS NULL OR coalesce({last}) IS NULL THEN s.item_ids
                    ELSE s.item_ids[1 : coalesce({last}) - 1] END AS item_ids
        FROM sequences s LEFT JOIN (SELECT user_id FROM holdout) h USING (user_id)
        ORDER BY s.user_id"""
    con = connect_warehouse(warehouse, settings, read_only=True)
    try:
        for batch in con.sql(query).to_arrow_reader(users_per_batch):
            items = batch.column(0)
            yield items.flatten().to_numpy(), items.value_lengths().fill_null(0).to_numpy()
    finally:
        con.close()


def _connect_for_write(path: Path, settings: Any, attempts: int = 20, wait: float = 1.0):
    """A read-write connection; retries while another process holds the file's lock."""
    import duckdb

    from taac_dagster.warehouse import connect_warehouse

    for attempt in range(attempts):
        try:
            return connect_warehouse(path, settings)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(wait)
    raise AssertionError("unreachable")


def write_item_semantic_ids(
    path: Path, settings: Any, creative_ids: np.ndarray, item_ids: np.ndarray, codes: np.ndarray, has_embedding: np.ndarray,
    info: dict[str, Any] | None = None,
) -> None:
    """Replace ``item_semantic_ids`` and its description ``item_semantic_ids_info`` (the
    codebooks' JSON: levels, size, family, build id) in one transaction, on a connection
    opened for it alone: that commit is the Semantic IDs' publish, so a reader never sees
    codes of one build described by another."""
    import pyarrow as pa

    levels = codes.shape[1]
    table = pa.table(
        {
            "creative_id": pa.array(creative_ids, pa.int64()),
            "item_id": pa.array(item_ids, pa.int64(), mask=item_ids < 0),
            "codes": pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1), pa.int32()), levels),
            "has_embedding": pa.array(has_embedding, pa.bool_()),
        }
    )
    con = _connect_for_write(path, settings)
    try:
        con.register("_semantic_ids", table)
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(
                f"""CREATE OR REPLACE TABLE {TABLE} (
                        creative_id BIGINT NOT NULL PRIMARY KEY, item_id BIGINT,
                        codes INTEGER[] NOT NULL, has_embedding BOOLEAN NOT NULL)"""
            )
            con.execute(
                f"""INSERT INTO {TABLE}
                    SELECT creative_id, item_id, CAST(codes AS INTEGER[]), has_embedding
                    FROM _semantic_ids ORDER BY creative_id"""
            )
            con.execute(f"CREATE OR REPLACE TABLE {INFO_TABLE} (info VARCHAR NOT NULL)")
            con.execute(f"INSERT INTO {INFO_TABLE} VALUES (?)", [json.dumps(info or {}, sort_keys=True, default=str)])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.unregister("_semantic_ids")
        con.execute("CHECKPOINT")
    finally:
        con.close()


def _synthetic_topics(paths: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(creative ids, topics) of the generator's ground truth, when the source is synthetic."""
    import pyarrow.parquet as pq

    from taac_dagster.sources.synthetic import GROUND_TRUTH_DIR

    if not paths.raw_manifest.is_file():
        return None
    manifest = json.loads(paths.raw_manifest.read_text())
    truth = Path(manifest.get("root", "")) / GROUND_TRUTH_DIR / "items.parquet"
    if manifest.get("source") != "synthetic" or not truth.is_file():
        return None
    table = pq.read_table(truth, columns=["creative_id", "topic"])
    ids = table.column("creative_id").to_numpy().astype(np.int64)
    order = np.argsort(ids)
    return ids[order], table.column("topic").to_numpy()[order]


def _lookup(sorted_ids: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row in sorted_ids, found mask) for each query id."""
    if len(sorted_ids) == 0:
        return np.zeros(len(query), np.int64), np.zeros(len(query), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, query), len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == query


class FamilyReader:
    """One family's ``emb_<family>.parquet`` (creative_id, item_id, FLOAT[d]), matched to
    ``creative_ids`` and streamed in row batches: the whole matrix is never in memory (4.78M
    items x 4096-d would be 78 GB). A creative id listed twice keeps its first row.

    ``has_embedding[i]``: item i of ``creative_ids`` has a vector; its vector is the
    ``embedded_index``-th, counting embedded items in the order of ``creative_ids``.
    """

    def __init__(self, path: Path, creative_ids: np.ndarray) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        # pre_buffer would keep every column chunk read so far: memory grows to the file size.
        self.handle = pq.ParquetFile(self.path, pre_buffer=False)
        file_ids = self.handle.read(columns=["creative_id"]).column(0).to_numpy().astype(np.int64)
        uniq, first = np.unique(file_ids, return_index=True)
        position, self.has_embedding = _lookup(uniq, np.asarray(creative_ids, np.int64))
        self.n_embedded = int(self.has_embedding.sum())
        # File row -> embedded index (-1: not wanted, or a repeated creative id).
        self.dest = np.full(len(file_ids), -1, np.int64)
        self.dest[first[position[self.has_embedding]]] = np.arange(self.n_embedded)

    def batches(self, wanted: np.ndarray | None = None):
        """Yield (embedded indices, float32 vectors) in file order; only ``wanted`` (a sorted
        array of embedded indices) when given."""
        import pyarrow as pa

        emb_type = self.handle.schema_arrow.field("emb").type
        dim = emb_type.list_size if pa.types.is_fixed_size_list(emb_type) else 1024
        offset = 0
        for batch in self.handle.iter_batches(
            columns=["emb"], batch_size=max(1, _CHUNK_VALUES // dim), use_threads=False
        ):
            rows = batch.num_rows
            target = self.dest[offset : offset + rows]
            offset += rows
            take = target >= 0
            if wanted is not None:
                take &= _lookup(wanted, target)[1]
            if not take.any():
                continue
            values = batch.column(0).flatten().to_numpy(zero_copy_only=False)
            matrix = values.reshape(rows, -1)
            yield target[take], np.asarray(matrix[take], np.float32)

    def read(self, wanted: np.ndarray) -> np.ndarray:
        """float32 [len(wanted), d]: the vectors of the sorted embedded indices ``wanted``."""
        out: np.ndarray | None = None
        for index, vectors in self.batches(wanted):
            if out is None:
                out = np.empty((len(wanted), vectors.shape[1]), np.float32)
            out[np.searchsorted(wanted, index)] = vectors
        return out if out is not None else np.empty((0, 0), np.float32)


class MatrixReader:
    """In-memory vectors keyed by item id, read like a ``FamilyReader`` (collaborative vectors).

    ``item_ids`` (sorted) and ``vectors`` row-aligned; ``wanted_item_ids`` in the order of the
    items to code (-1: no re-id, so no vector).
    """

    def __init__(self, item_ids: np.ndarray, vectors: np.ndarray, wanted_item_ids: np.ndarray) -> None:
        position, self.has_embedding = _lookup(np.asarray(item_ids, np.int64), np.asarray(wanted_item_ids, np.int64))
        self.matrix = np.asarray(vectors, np.float32)[position[self.has_embedding]]
        self.n_embedded = len(self.matrix)

    def batches(self, wanted: np.ndarray | None = None):
        index = np.arange(self.n_embedded) if wanted is None else np.asarray(wanted)
        chunk = max(1, _CHUNK_VALUES // max(self.matrix.shape[1], 1))
        for lo in range(0, len(index), chunk):
            part = index[lo : lo + chunk]
            yield part, self.matrix[part]

    def read(self, wanted: np.ndarray) -> np.ndarray:
        return self.matrix[np.asarray(wanted)]


@dataclass
class ItemVectors:
    """The vectors the codes quantize, chosen for a track (content family or collaborative)."""

    reader: FamilyReader | MatrixReader
    source: str  # "content:<family>" or "collaborative"
    family: int | None
    dim: int
    coverage: ContentCoverage
    universe: dict[str, np.ndarray]  # every item and candidate: creative_id, item_id, group_key, ...
    collaborative_stats: dict[str, Any] | None = None


@dataclass
class ItemCodes:
    """Every item's code tuple: RQ levels (fallbacks included) plus the disambiguation code."""

    encoded: Encoded  # the embedded items' codes and errors
    rq_codes: np.ndarray  # int32 [n, levels]
    disambiguation: np.ndarray  # int32 [n]
    codes: np.ndarray  # int32 [n, levels + 1]: rq_codes, then the disambiguation code
    missing: np.ndarray  # rows without a vector (advertiser mean or unknown)


def build_semantic_ids(paths: TrackPaths, settings: TaacSettings, *, logger: Any = None) -> SemanticIdResult:
    """Fit codebooks on the track's item vectors, code every item and candidate, write both.

    The vectors are the chosen content family's embeddings, or collaborative vectors learned
    from the ``sequences`` table (``models.collaborative``) when the source is collaborative, or
    auto and the family covers too few items (or there is none).
    """
    logger = logger or log
    seconds: dict[str, float] = {}
    vectors = choose_item_vectors(paths, settings, logger, seconds)
    cfg = _config(settings.semantic_ids, vectors, logger)
    started = time.perf_counter()
    train = vectors.reader.read(training_sample(int(vectors.reader.has_embedding.sum()), cfg))  # fit's own subsample
    codebooks = fit_rq_kmeans(train, cfg, logger=logger, overwrite_input=True)
    del train
    seconds["fit"] = time.perf_counter() - started
    started = time.perf_counter()
    item_codes = encode_items(codebooks, vectors, logger)
    seconds["encode"] = time.perf_counter() - started
    metrics = code_metrics(codebooks, vectors, item_codes)
    logger.info(
        f"utilization {metrics['utilization']}, reconstruction error {metrics['reconstruction_error']}, "
        f"collisions {metrics['collision_rate_before']:.1%} -> 0 (max disambiguation {metrics['max_disambiguation']})"
    )
    truth = _synthetic_topics(paths)
    if truth is not None:
        metrics["topic_recovery"] = _topic_recovery(truth, codebooks, vectors, item_codes, cfg.seed)
        logger.info(f"level-1 codes vs planted topics: {metrics['topic_recovery']}")
    started = time.perf_counter()
    _write(paths, settings, codebooks, vectors, item_codes, metrics)
    seconds["write"] = time.perf_counter() - started
    logger.info(f"wrote {len(item_codes.rq_codes)} rows to {TABLE} and the codebooks to {paths.codebooks}")
    return SemanticIdResult(
        vectors.source, vectors.family, vectors.dim, codebooks, item_codes.codes, vectors.universe["creative_id"],
        vectors.reader.has_embedding, metrics, paths.codebooks, paths.warehouse, seconds, vectors.coverage,
    )


def choose_item_vectors(paths: TrackPaths, settings: TaacSettings, logger: Any, seconds: dict[str, float]) -> ItemVectors:
    """The content family's embeddings when the source allows it and they cover enough items,
    else collaborative vectors from the training sequences (``settings.semantic_ids.source``)."""
    sid = settings.semantic_ids
    started = time.perf_counter()
    families, universe = _read_inputs(paths, settings)
    family_row = _choose_family(families, sid.family, settings.embedding_families, paths.track)
    creative_ids = universe["creative_id"]
    n = len(creative_ids)
    content = FamilyReader(Path(family_row[2]), creative_ids) if family_row is not None else None
    n_content = content.n_embedded if content is not None else 0
    k_content = sid.codebook_size or auto_codebook_size(n_content)
    coverage = ContentCoverage(
        family=int(family_row[0]) if family_row is not None else None,
        items=n,
        items_with_content=n_content,
        min_items=sid.min_items if sid.min_items is not None else max(k_content, math.ceil(0.02 * n)),
    )
    kind = choose_source(sid.source, coverage, paths.track)
    seconds["read"] = time.perf_counter() - started
    if kind == "content":
        assert content is not None and family_row is not None
        return ItemVectors(content, f"content:{coverage.family}", coverage.family, int(family_row[1]), coverage, universe)
    if sid.source == "auto":
        logger.warning(
            f"content coverage too low for Semantic IDs ({coverage.to_metadata()}): "
            "using collaborative vectors from the training sequences"
        )
    started = time.perf_counter()
    learned = collaborative_vectors(
        partial(sequence_batches, paths.warehouse, settings, get_track(paths.track).target_priority),
        CollaborativeConfig(
            dim=sid.collaborative_dim, window=sid.collaborative_window, max_items=sid.collaborative_max_items,
            seed=sid.seed,
        ),
    )
    seconds["collaborative"] = time.perf_counter() - started
    if len(learned.item_ids) == 0:
        raise SemanticIdInputError(
            f"no item of track {paths.track} has a collaborative vector (no two items share a training "
            f"sequence), and content vectors were not used ({coverage.to_metadata()}): Semantic IDs need "
            "one or the other"
        )
    reader = MatrixReader(learned.item_ids, learned.vectors, universe["item_id"])
    return ItemVectors(reader, "collaborative", None, learned.vectors.shape[1], coverage, universe, learned.stats)


def _config(sid: Any, vectors: ItemVectors, logger: Any) -> SemanticIdConfig:
    """The RQ-KMeans config of the settings, K chosen from the items with a vector when unset."""
    n_embedded = int(vectors.reader.has_embedding.sum())
    k = sid.codebook_size or auto_codebook_size(n_embedded)
    logger.info(
        f"source {vectors.source} ({vectors.dim}-d): {n_embedded} of {len(vectors.universe['creative_id'])} items "
        f"have a vector; {sid.levels} levels x K={k}, whiten={sid.whiten}"
    )
    return SemanticIdConfig(
        levels=sid.levels, codebook_size=k, whiten=sid.whiten, whiten_dim=sid.whiten_dim, niter=sid.niter,
        seed=sid.seed, max_train_points=sid.max_train_points, normalize=sid.normalize,
    )


def encode_items(codebooks: RQCodebooks, vectors: ItemVectors, logger: Any) -> ItemCodes:
    """One streaming pass encodes every item with a vector and sums, per advertiser, the vectors
    that items without one borrow (their advertiser's mean, else the unknown code); then the
    disambiguation code makes every tuple unique."""
    reader, group_key = vectors.reader, vectors.universe["group_key"]
    has_embedding = reader.has_embedding
    embedded, missing = np.flatnonzero(has_embedding), np.flatnonzero(~has_embedding)
    n_embedded, levels = len(embedded), codebooks.levels
    embedded_keys = group_key[embedded]
    means = GroupMeans(group_key[missing], vectors.dim)
    encoded = Encoded(
        np.empty((n_embedded, levels), np.int32), np.empty((n_embedded, levels), np.float32), np.empty(n_embedded, np.float32),
    )
    done = 0
    for index, batch in reader.batches():
        part = encode_with_errors(codebooks, batch)
        encoded.codes[index], encoded.level_sq_error[index], encoded.sq_norm[index] = (
            part.codes, part.level_sq_error, part.sq_norm
        )
        means.add(embedded_keys[index], batch)
        done += len(index)
        if n_embedded >= 200_000 and done % 200_000 < len(index):
            logger.info(f"encoded {done:,} of {n_embedded:,} items")
    rq_codes = np.full((len(has_embedding), levels), codebooks.unknown_code, np.int32)
    rq_codes[embedded] = encoded.codes
    rq_codes[missing] = means.codes(codebooks, group_key[missing])
    priority = np.full(len(has_embedding), np.inf)
    priority[embedded] = encoded.level_sq_error[:, -1]
    disamb = resolve_collisions(rq_codes, priority, vectors.universe["creative_id"])
    item_codes = ItemCodes(encoded, rq_codes, disamb, np.concatenate([rq_codes, disamb[:, None]], axis=1), missing)
    after = collision_rate(item_codes.codes)
    if after != 0.0:
        raise AssertionError(f"collision resolution left {after:.2%} duplicate tuples")
    return item_codes


def code_metrics(codebooks: RQCodebooks, vectors: ItemVectors, item_codes: ItemCodes) -> dict[str, Any]:
    """Counts, utilization and reconstruction error per level, collision rates (the metadata)."""
    missing, rq_codes, encoded = item_codes.missing, item_codes.rq_codes, item_codes.encoded
    unknown = int((rq_codes[missing, 0] == codebooks.unknown_code).sum())
    metrics: dict[str, Any] = {
        "items": len(rq_codes),
        "items_with_embedding": len(encoded.codes),
        "items_fallback_advertiser": len(missing) - unknown,
        "items_fallback_unknown": unknown,
        "items_without_creative_id_skipped": int(vectors.universe["items_without_creative_id"][0]),
        "levels": codebooks.levels,
        "codebook_size": codebooks.codebook_size,
        "utilization": [round(u, 4) for u in utilization(encoded.codes, codebooks.codebook_size)],
        "reconstruction_error": [round(e, 4) for e in reconstruction_error(encoded)],
        "collision_rate_before": round(collision_rate(rq_codes), 4),
        "collision_rate_before_embedded": round(collision_rate(encoded.codes), 4),
        "collision_rate_after": 0.0,  # encode_items refuses anything else
        "max_disambiguation": int(item_codes.disambiguation.max(initial=0)),
        "content_coverage": round(vectors.coverage.share, 4),
    }
    if vectors.collaborative_stats is not None:
        metrics["collaborative"] = vectors.collaborative_stats
    return metrics


def _topic_recovery(
    truth: tuple[np.ndarray, np.ndarray], codebooks: RQCodebooks, vectors: ItemVectors, item_codes: ItemCodes, seed: int
) -> dict[str, Any]:
    """Synthetic data: how well level-1 codes recover the planted topics (NMI, purity, chance)."""
    has_embedding, rq_codes = vectors.reader.has_embedding, item_codes.rq_codes
    pos, found = _lookup(truth[0], vectors.universe["creative_id"])
    topics = truth[1][pos]
    on = has_embedding & found
    recovery = topic_recovery(rq_codes[on, 0], topics[on], seed=seed)
    # Fallback items (advertiser mean): does their level-1 code's majority topic match theirs?
    fb = ~has_embedding & found & (rq_codes[:, 0] != codebooks.unknown_code)
    if fb.any():
        joint = np.zeros((codebooks.codebook_size, int(truth[1].max()) + 1), np.int64)
        np.add.at(joint, (rq_codes[on, 0], topics[on]), 1)
        recovery["fallback_topic_accuracy"] = round(float((joint.argmax(1)[rq_codes[fb, 0]] == topics[fb]).mean()), 4)
    return recovery


def _write(
    paths: TrackPaths, settings: TaacSettings, codebooks: RQCodebooks, vectors: ItemVectors, item_codes: ItemCodes,
    metrics: dict[str, Any],
) -> None:
    """The codebooks folder (atomically), then the item_semantic_ids table with the codebooks'
    description (one transaction, the commit point). Both carry one build id: a crash between
    the two leaves the table and its description of the previous build, which is what training
    reads (``models.data``); the codebooks folder alone may then be newer."""
    from taac_dagster.atomic import atomic_dir

    metadata = {
        "build_id": uuid.uuid4().hex[:12],
        "source": vectors.source,
        "family": vectors.family,
        "family_dim": vectors.dim if vectors.family is not None else None,
        "track": paths.track,
        "content_coverage": vectors.coverage.to_metadata(),
        "metrics": metrics,
    }
    with atomic_dir(paths.codebooks) as tmp:
        codebooks.save(tmp, metadata)
    write_item_semantic_ids(
        paths.warehouse, settings, vectors.universe["creative_id"], vectors.universe["item_id"], item_codes.codes,
        vectors.reader.has_embedding, json.loads((paths.codebooks / CODEBOOKS_JSON).read_text()),
    )
