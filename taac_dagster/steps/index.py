"""The ``faiss_index`` step: the configured preset's item tower over the whole candidate pool
(cold items included) -> a Faiss index -> recall@10 against exact search on real holdout
queries -> ``<root>/<track>/indexes/<preset>/``; and the index opened again for scoring, refused
unless it was built from the very checkpoint and pool it is asked for.

Write, audit, publish: the recall of the new index is measured before it is saved, and only an
index at or above ``settings.retrieval.recall_floor`` replaces the published one; one below it
is saved under ``indexes/rejected/`` and ``IndexRecallBelowFloor`` is raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint_fit import EvaluationError, LoadedModel
from models.data import Arrays, holdout_batch
from models.index_files import index_metadata as checked_index_metadata
from models.index_files import load_index, write_index_files
from models.index_spec import IndexSpec, auto_nlist, default_index_spec, default_nprobe
from models.index_tuning import measure_recall, tune_ef_search, tune_nprobe
from models.metrics import K
from models.retrieval import ItemIndex, build_index, flat_like, pool_fingerprint
from models.scoring import as_ids, pool_item_vectors, pool_positions, query_vectors, sample_rows
from taac_dagster.atomic import atomic_dir, keep_newest
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import RetrievalSettings, TaacSettings
from taac_dagster.steps.trained_encoder import compute_device, load_model, track_arrays

log = logging.getLogger(__name__)

REJECTED_DIR = "rejected"  # indexes below the recall floor, kept for inspection


def index_path(paths: TrackPaths, preset: str) -> Path:
    return Path(paths.indexes) / Path(preset).stem


def save_index(path: str | Path, index: ItemIndex, metadata: Mapping[str, Any]) -> Path:
    """Write ``index`` into the folder ``path`` atomically (index, id map, metadata); the old
    complete index stays in place until the new one is complete.

    ``metadata`` must name the checkpoint the vectors came from (``checkpoint_version``, e.g.
    the checkpoint asset's data version); anything else JSON-serializable is kept as is.
    """
    meta = checked_index_metadata(index, metadata)  # refused before any folder is made
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_index_files(tmp, index, meta)
    index.metadata = meta
    return path


def index_spec_from_settings(rs: RetrievalSettings, pool_size: int, *, normalize: bool = True) -> IndexSpec:
    """The index asked for by ``settings.retrieval`` (``auto``: ``default_index_spec``)."""
    base = default_index_spec(pool_size)
    kind = base.kind if rs.index == "auto" else rs.index
    nlist = rs.nlist or (auto_nlist(pool_size) if kind == "ivf" else None)
    nprobe = rs.nprobe or (default_nprobe(nlist) if kind == "ivf" and nlist is not None else IndexSpec().nprobe)
    return IndexSpec(
        kind=kind, nlist=nlist, nprobe=nprobe, M=rs.hnsw_m, ef_construction=rs.hnsw_ef_construction,
        ef_search=rs.hnsw_ef_search, normalize=normalize,
    )


def measure_and_tune(
    index: ItemIndex, queries: np.ndarray, exclude: np.ndarray | None, rs: RetrievalSettings, k: int = K
) -> tuple[float, bool]:
    """recall@k against exact search on ``queries`` (tuning nprobe / efSearch up to the target
    when ``rs.tune``); returns (recall, tuned)."""
    if index.spec.kind == "flat" or not len(queries):
        return 1.0, False
    exact = flat_like(index)
    if rs.tune and index.spec.kind == "ivf":
        # Without an nprobe asked for, climb from 1/256 of the lists: the smallest nprobe that
        # reaches the target on real queries is the cheapest index for the 1M-user evaluation.
        start = index.spec.nprobe if rs.nprobe else max(1, (index.spec.nlist or 1) // 256)
        return tune_nprobe(index, exact, queries, rs.recall_target, k, exclude=exclude, start=start)[1], True
    if rs.tune and index.spec.kind == "hnsw":
        return tune_ef_search(index, exact, queries, rs.recall_target, k, exclude=exclude)[1], True
    return measure_recall(index, exact, queries, k, exclude=exclude), False


@dataclass
class IndexBuild:
    path: Path
    spec: IndexSpec
    recall: float
    recall_queries: int
    tuned: bool
    pool_size: int
    cold_items: int
    dim: int
    checkpoint_version: str
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    def to_metadata(self) -> dict[str, Any]:
        return {
            "index_path": str(self.path),
            "index": self.spec.describe(),
            "index_kind": self.spec.kind,
            "spec": self.spec.to_json(),
            "recall@10": round(self.recall, 5),
            "recall_queries": self.recall_queries,
            "tuned": self.tuned,
            "pool_size": self.pool_size,
            "cold_items": self.cold_items,
            "dim": self.dim,
            "checkpoint_version": self.checkpoint_version,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "warnings": self.warnings,
        }


def index_model_pool(
    loaded: LoadedModel, arrays: Arrays, settings: TaacSettings, device: torch.device, logger: logging.Logger,
    seconds: dict[str, float],
) -> tuple[ItemIndex, float, bool, int]:
    """Embed the pool with ``loaded``'s item tower, index it as ``settings.retrieval`` asks and
    measure (and tune) recall@10 on a sample of real holdout queries. Returns (index, recall,
    tuned, sample size); phase times go to ``seconds``."""
    rs, es = settings.retrieval, settings.evaluation
    t = time.perf_counter()
    vectors = pool_item_vectors(loaded, arrays, device)
    seconds["item_vectors"] = time.perf_counter() - t
    creative = np.asarray(arrays.cand_creative).astype(np.int64)
    spec = index_spec_from_settings(rs, len(creative), normalize=loaded.normalize)
    logger.info(f"indexing {len(creative):,} candidates ({vectors.shape[1]}-d) for '{loaded.preset}' with {spec.describe()}")
    t = time.perf_counter()
    index = build_index(vectors, creative, spec, seed=rs.seed, threads=rs.threads)
    seconds["build"] = time.perf_counter() - t

    t = time.perf_counter()
    sample = sample_rows(int(arrays.meta["num_holdout"]), rs.recall_sample, rs.seed)
    inputs = holdout_batch(arrays, sample)
    queries = query_vectors(loaded, inputs, device, es.query_batch_size)
    exclude = as_ids(pool_positions(arrays)[inputs["items"]], creative) if es.exclude_history else None
    recall, tuned = measure_and_tune(index, queries, exclude, rs)
    seconds["recall"] = time.perf_counter() - t
    logger.info(f"recall@10 {recall:.4f} on {len(sample)} holdout queries with {index.spec.describe()}")
    return index, recall, tuned, int(len(sample))


class IndexRecallBelowFloor(EvaluationError):
    """The built index missed the recall floor: it was set aside, the published one kept."""

    def __init__(self, build: IndexBuild, floor: float, published: Path) -> None:
        self.build = build
        self.floor = floor
        kept = f"{published} was left as it was" if published.exists() else f"nothing was published at {published}"
        super().__init__(
            f"recall@10 {build.recall:.4f} of the new index ({build.spec.describe()}, {build.recall_queries} holdout "
            f"queries) is below the floor {floor} (TAAC_RETRIEVAL__RECALL_FLOOR), so it was not published ({kept}); "
            f"it is kept for inspection at {build.path}. Raise nprobe / efSearch, turn TAAC_RETRIEVAL__TUNE on, or "
            "use the flat index."
        )


def _destination(paths: TrackPaths, preset: str, published: bool) -> Path:
    """Where a new index is saved: the published place, or a stamped folder under ``rejected/``."""
    if published:
        return index_path(paths, preset)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Path(paths.indexes) / REJECTED_DIR / f"{preset}-{stamp}"


def build_track_index(paths: TrackPaths, settings: TaacSettings, *, logger: logging.Logger | None = None) -> IndexBuild:
    """Index the whole candidate pool with the configured preset's checkpoint (see module doc)."""
    logger = logger or log
    device = compute_device(settings)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    arrays = track_arrays(paths, settings, logger)
    loaded = load_model(paths, settings.training.preset, arrays, device)
    for warning in loaded.warnings:
        logger.warning(warning)
    index, recall, tuned, queries = index_model_pool(loaded, arrays, settings, device, logger, seconds)
    floor = settings.retrieval.recall_floor
    published = recall >= floor
    destination = _destination(paths, loaded.preset, published)
    save_index(destination, index, index_metadata(
        loaded, arrays, recall=recall, recall_queries=queries, tuned=tuned,
        exclude_history_in_recall=settings.evaluation.exclude_history,
    ))
    if not published:
        keep_newest(destination.parent, settings.rejected_keep)
    seconds["total"] = time.perf_counter() - started
    build = IndexBuild(
        path=destination, spec=index.spec, recall=recall, recall_queries=queries, tuned=tuned,
        pool_size=index.size, cold_items=int(np.asarray(arrays.cand_cold).sum()), dim=index.dim,
        checkpoint_version=loaded.checkpoint_version, seconds=seconds, warnings=loaded.warnings,
    )
    if not published:
        raise IndexRecallBelowFloor(build, floor, index_path(paths, loaded.preset))
    return build


def index_metadata(loaded: LoadedModel, arrays: Arrays, **figures: Any) -> dict[str, Any]:
    """What ties a saved index to its checkpoint and data, plus its measured ``figures``."""
    return {
        "checkpoint_version": loaded.checkpoint_version,
        "checkpoint": str(loaded.path),
        "preset": loaded.preset,
        "arrays_data_version": arrays.data_version,
        "id_space": "creative_id",
        **figures,
    }


def open_track_index(paths: TrackPaths, loaded: LoadedModel, arrays: Arrays, threads: int | None = None) -> ItemIndex:
    """The saved index of ``loaded``'s preset, refused unless it was built from this very
    checkpoint over this very pool (``IndexMismatchError`` otherwise)."""
    creative = np.asarray(arrays.cand_creative).astype(np.int64)
    return load_index(
        index_path(paths, loaded.preset),
        expected_checkpoint_version=loaded.checkpoint_version,
        expected={"pool_fingerprint": pool_fingerprint(creative), "dim": int(loaded.model.cfg.vector_dim)},
        threads=threads,
    )


__all__ = [
    "IndexBuild",
    "IndexRecallBelowFloor",
    "build_track_index",
    "index_metadata",
    "index_model_pool",
    "index_path",
    "index_spec_from_settings",
    "measure_and_tune",
    "open_track_index",
    "save_index",
]
