"""Semantic IDs: residual k-means (RQ-KMeans) codebooks over item vectors, and the codes
they give a vector.

An item's Semantic ID is a short tuple of codes. Level 1 is the nearest of K centroids to the
item's (normalized, optionally whitened) embedding; level l + 1 quantizes what level l left
over (the residual). Similar items share a prefix, so a generative model can decode an item
coarse to fine.

    x' = whiten(normalize(x))            optional L2 normalization, optional PCA whitening
    r_0 = x';  c_l = argmin_k |r_l - C_l[k]|;  r_{l+1} = r_l - C_l[c_l]      for l < levels

Determinism: the training subsample and faiss's k-means initialisation depend on ``seed``
only; assignment is exact (``IndexFlatL2``). Same input and config, same codes.

Plain numpy + faiss (docs/semantic_ids.md). The rest of the Semantic ID code:
``models.semantic_id_collisions`` (the disambiguation level that makes tuples unique),
``models.semantic_id_quality`` (utilization, reconstruction error, topic recovery),
``models.item_vectors`` (the vectors of a catalogue's items, streamed),
``models.item_semantic_ids`` (every item's code tuple, fallbacks included); one track's
build, warehouse in and tables out, is ``taac_dagster.steps.semantic_ids``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

log = logging.getLogger(__name__)

CODEBOOKS_NPZ = "codebooks.npz"
CODEBOOKS_JSON = "codebooks.json"
_CHUNK_VALUES = 1 << 24  # rows per encoding chunk = this / dim (64 MiB of float32)
_SINGLE_THREAD_WORK = 1 << 27  # n * K * d below this: one faiss thread (threads cost more)


def chunk_rows(dim: int) -> int:
    """Rows of ``dim`` values that make one chunk of streamed work (at least one row)."""
    return max(1, _CHUNK_VALUES // max(dim, 1))


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
    chunk = chunk_rows(residual.shape[1])
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
    return np.asarray(km.centroids, np.float32)  # no copy: faiss's centroids are float32


def fit_rq_kmeans(
    vectors: np.ndarray, cfg: SemanticIdConfig | None = None, *, logger: logging.Logger | None = None,
    overwrite_input: bool = False,
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
    chunk = chunk_rows(codebooks.input_dim)
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


def auto_codebook_size(n_items: int, cap: int = 256) -> int:
    """K for small catalogues: min(cap, max(8, round(sqrt(n)))); 256 for >= 65,536 items."""
    return int(min(cap, max(8, round(math.sqrt(max(n_items, 0))))))
