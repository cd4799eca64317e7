"""Scoring a trained encoder on a track: the Faiss index of the candidate pool, the evaluation
of every holdout user, and the submission file.

    build_track_index(paths, settings)   item tower over the whole pool (cold items included)
                                         -> Faiss index -> recall@10 vs exact on real queries
                                         -> <root>/<track>/indexes/<preset>/ (atomic)
    encode_track_users(paths, settings)  every holdout (and predict_seq) user's query vector,
                                         once per checkpoint -> <root>/<track>/vectors/<preset>/
    evaluate_track(paths, settings)      every holdout user: top-10 from the index, HR@10,
                                         NDCG@10, Score (w-* on 10M) for the model, popularity,
                                         the baseline preset, the oracle; slices, plots
                                         -> <root>/<track>/reports/evaluation.{md,html,json}
    submission_for_track(paths, settings) top-10 creative ids per raw user id, validated
                                         -> <root>/<track>/reports/submission.json

Ids: the index's id map holds creative ids (the submission's id space); everything scored is
kept as *pool positions* (0..C-1, the order of ``arrays.cand_*``), so targets, exclusions and
every method's lists are compared in one space.

Two pools: the index covers every candidate, the *released* pool (``arrays.cand_released``:
the published pool, or every candidate when nothing was published) plus the holdout targets
the warehouse added to it. The submission and every row of the report but one recommend from
the released pool only, so a target outside it is a miss, as on the leaderboard; the share of
such targets is reported (``targets_outside_pool_share``), and ``model_extended`` ("model
(pool + missing targets)") scores the model on the whole index when the pools differ.

Search backends (``search_backend``): Faiss on the CPU, or, on a CUDA device with a flat index
(``evaluation.search_backend``), exact matmul + top-k in torch with the pool's vectors held on
the device (models/torch_search.py); the choice is recorded in the report and the submission.

The report and the submission read the user vectors (models/user_vectors.py) instead of
encoding the histories again. Users are processed in chunks (``CHUNK_USERS``): per chunk the
index is searched and every method's lists scored, so memory stays flat at 1M users.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.allocator import keep_freed_memory
from models.baselines import oracle_topk, popularity_order, popularity_topk
from models.data import Arrays, holdout_batch, released_mask, trim_padding
from models.distributed import pick_device
from models.encoder import Encoder, EncoderConfig
from models.metrics import K, score, target_ranks
from models.predict import PREDICT_FILE, find_predict_file, read_predict_inputs
from models.report import ReportData, ReportFiles, headline_figures, oracle_share, slice_frame, slice_metrics, write_report
from models.retrieval import (
    IndexSpec,
    ItemIndex,
    auto_nlist,
    build_index,
    default_index_spec,
    default_nprobe,
    flat_like,
    load_index,
    measure_recall,
    pool_fingerprint,
    save_index,
    search,
    set_threads,
    torch_exact_search,
    torch_index,
    tune_ef_search,
    tune_nprobe,
)
from models.submission import write_submission
from models.train import LAST, cpu_threads, default_retrieval_actions, load_encoder, loss_curve, prepare_track_arrays, to_device
from models.user_vectors import (
    HOLDOUT,
    PREDICT,
    UserVectorsMismatchError,
    file_fingerprint,
    open_user_vectors,
    write_user_vectors,
)
from models.weighted_metrics import PAD, relevance_weights, weighted_per_user
from taac_dagster.atomic import keep_newest
from taac_dagster.errors import TaacError
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import TaacSettings
from taac_dagster.tracks import Track, get_track

log = logging.getLogger(__name__)

CHUNK_USERS = 65_536
ITEM_BATCH = 65_536
REPORT_NAME = "evaluation"
REJECTED_DIR = "rejected"  # indexes below the recall floor, kept for inspection
SUBMISSION_FILE = "submission.json"
# A weighted target that is no candidate: below PAD (-1, also a search hole), so never matched.
OUTSIDE_POOL = PAD - 1
# EncoderConfig fields that describe the data, not the architecture: a checkpoint is usable on
# arrays only when these agree (vocabulary sizes, multi-modal dims, Semantic ID levels, ...).
SHAPE_FIELDS = (
    "num_item_rows", "id_rows", "item_vocab", "user_vocab", "num_user_sparse", "multi_len",
    "mm_dims", "sid_vocab", "n_actions", "max_len",
)


class EvaluationError(TaacError, ValueError):
    """The checkpoint, the index and the data do not fit together, or there is nothing to score."""


class CheckpointMismatchError(EvaluationError):
    """A checkpoint trained on data of another shape (vocabularies, families, ...)."""


class StaleCheckpointError(CheckpointMismatchError):
    """A checkpoint trained on other arrays of the same shape (another data version)."""


# --- Checkpoint and arrays ---------------------------------------------------------------
def checkpoint_path(paths: Any, preset: str) -> Path:
    return Path(paths.checkpoints) / Path(preset).stem / LAST


def index_path(paths: Any, preset: str) -> Path:
    return Path(paths.indexes) / Path(preset).stem


def vectors_path(paths: Any, preset: str) -> Path:
    return Path(paths.vectors) / Path(preset).stem


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def check_checkpoint_fits(ckpt: dict[str, Any], arrays: Arrays, path: Path) -> list[str]:
    """Raise ``CheckpointMismatchError`` when the checkpoint cannot score these arrays, and
    ``StaleCheckpointError`` when it was trained on another data version of them (same shapes:
    it would load, and describe a model of other data); return warnings (none today)."""
    have = ckpt.get("model_config") or {}
    want = EncoderConfig.from_meta(arrays.meta).to_dict()
    problems = [
        f"{key}: checkpoint {_plain(have.get(key))!r}, data {_plain(want[key])!r}"
        for key in SHAPE_FIELDS
        if _plain(have.get(key)) != _plain(want[key])
    ]
    for key, value in (ckpt.get("data_shape") or {}).items():
        if _plain(value) != _plain(arrays.meta.get(key)):
            problems.append(f"{key}: checkpoint {value!r}, data {arrays.meta.get(key)!r}")
    if problems:
        raise CheckpointMismatchError(
            f"{path}: the checkpoint does not match the track's data ({'; '.join(problems)}); it was trained "
            f"on data version {ckpt.get('data_version')!r}, the arrays are {arrays.data_version!r}. "
            "Re-materialize encoder_checkpoint for this data (or point TAAC_DATA_ROOT at the data it was trained on)."
        )
    if ckpt.get("data_version") != arrays.data_version:
        raise StaleCheckpointError(
            f"{path}: the checkpoint was trained on arrays of data version {ckpt.get('data_version')!r}, the current "
            f"arrays ({arrays.folder}) are data version {arrays.data_version!r} (same shapes, other data or settings). "
            "Re-materialize encoder_checkpoint for these arrays (or point TAAC_DATA_ROOT and the array settings, "
            "max_history, embedding_families, training.val_users, at what it was trained on)."
        )
    return []


@dataclass
class LoadedModel:
    preset: str
    path: Path
    model: Encoder
    ckpt: dict[str, Any]
    actions: tuple[int, ...]
    warnings: list[str]

    @property
    def checkpoint_version(self) -> str:
        return str(self.ckpt["checkpoint_version"])

    @property
    def normalize(self) -> bool:
        return self.model.cfg.similarity == "cosine"


def load_model(paths: Any, preset: str, arrays: Arrays, device: torch.device) -> LoadedModel:
    path = checkpoint_path(paths, preset)
    if not path.is_file():
        raise EvaluationError(
            f"{path}: no checkpoint of preset {preset!r} for track {paths.track}; materialize encoder_checkpoint "
            f"(with TAAC_TRAINING__PRESET={preset}) first"
        )
    # The model is rebuilt from the checkpoint's own config, so it loads whatever the data;
    # whether it fits these arrays is checked before anything is computed with it.
    model, ckpt = load_encoder(path, arrays, device)
    warnings = check_checkpoint_fits(ckpt, arrays, path)
    actions = tuple(ckpt.get("retrieval_actions") or default_retrieval_actions(paths.track))
    return LoadedModel(Path(preset).stem, path, model, ckpt, actions, warnings)


def compute_device(settings: Any) -> torch.device:
    """The device for the encoder, with the torch and Faiss CPU threads the settings ask for."""
    torch.set_num_threads(cpu_threads(settings.training.threads))
    set_threads(settings.retrieval.threads)
    keep_freed_memory()  # activations of each forward pass come back from the heap (models/allocator.py)
    return pick_device(settings.training.device)


def track_arrays(paths: Any, settings: Any, logger: Any = None) -> Arrays:
    arrays = prepare_track_arrays(paths, settings, logger=logger or log)
    if int(arrays.meta["num_candidates"]) == 0:
        raise EvaluationError(
            f"{paths.warehouse}: the candidate pool (table candidates) is empty: nothing to index or recommend"
        )
    return arrays


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
    out = np.zeros((n, loaded.model.cfg.d_model), np.float32)
    order = np.argsort((inputs["items"] > 0).sum(axis=1), kind="stable")
    for lo in range(0, n, batch_size):
        rows = order[lo : lo + batch_size]
        batch = to_device(trim_padding({key: value[rows] for key, value in inputs.items()}), device)
        out[rows] = loaded.model.user_vectors(batch, loaded.actions).float().cpu().numpy()
    return out


def pool_positions(arrays: Arrays) -> np.ndarray:
    """item row -> pool position (-1: not a candidate); row 0 (padding) is never a candidate."""
    cand_rows = np.asarray(arrays.cand_rows).astype(np.int64)
    position = np.full(int(arrays.meta["num_item_rows"]), -1, np.int64)
    position[cand_rows] = np.arange(len(cand_rows))
    return position


def _as_ids(positions: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)


# --- Search backends ---------------------------------------------------------------------
FAISS = "faiss"


def search_backend(settings: Any, device: torch.device, spec: IndexSpec) -> str:
    """``faiss``, or ``torch-<device type>`` (``evaluation.search_backend``; ``auto``: torch on
    a CUDA device, whatever the index kind: exact top-K over the pool's vectors (an IVF / HNSW
    index's read back) takes seconds there, so a GPU scores without the approximation; Faiss
    on a CPU, with the index as built)."""
    asked = settings.evaluation.search_backend
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


# --- The index ---------------------------------------------------------------------------
def index_spec_from_settings(rs: Any, pool_size: int, *, normalize: bool = True) -> IndexSpec:
    """The index asked for by ``settings.retrieval`` (``auto``: ``default_index_spec``)."""
    base = default_index_spec(pool_size)
    kind = base.kind if rs.index == "auto" else rs.index
    nlist = rs.nlist or (auto_nlist(pool_size) if kind == "ivf" else None)
    nprobe = rs.nprobe or (default_nprobe(nlist) if kind == "ivf" else IndexSpec().nprobe)
    return IndexSpec(
        kind=kind, nlist=nlist, nprobe=nprobe, M=rs.hnsw_m, ef_construction=rs.hnsw_ef_construction,
        ef_search=rs.hnsw_ef_search, normalize=normalize,
    )


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """A deterministic sorted sample of ``size`` row numbers out of ``n``."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def measure_and_tune(
    index: ItemIndex, queries: np.ndarray, exclude: np.ndarray | None, rs: Any, k: int = K
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
    loaded: LoadedModel, arrays: Arrays, settings: Any, device: torch.device, logger: Any, seconds: dict[str, float]
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
    exclude = _as_ids(pool_positions(arrays)[inputs["items"]], creative) if es.exclude_history else None
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


def build_track_index(paths: TrackPaths, settings: TaacSettings, *, logger: Any = None) -> IndexBuild:
    """Index the whole candidate pool with the configured preset's checkpoint (see module doc).

    Write, audit, publish: the recall of the new index is measured before it is saved, and only
    an index at or above ``settings.retrieval.recall_floor`` replaces the published one; one
    below it is saved under ``indexes/rejected/`` and ``IndexRecallBelowFloor`` is raised."""
    logger = logger or log
    es = settings.evaluation
    device = compute_device(settings)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    arrays = track_arrays(paths, settings, logger)
    loaded = load_model(paths, settings.training.preset, arrays, device)
    for warning in loaded.warnings:
        logger.warning(warning)
    index, recall, tuned, queries = index_model_pool(loaded, arrays, settings, device, logger, seconds)
    target = index_path(paths, loaded.preset)
    floor = settings.retrieval.recall_floor
    published = recall >= floor
    if not published:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        destination = Path(paths.indexes) / REJECTED_DIR / f"{loaded.preset}-{stamp}"
    else:
        destination = target
    save_index(destination, index, index_metadata(
        loaded, arrays, recall=recall, recall_queries=queries, tuned=tuned,
        exclude_history_in_recall=es.exclude_history,
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
        raise IndexRecallBelowFloor(build, floor, target)
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


def open_track_index(paths: Any, loaded: LoadedModel, arrays: Arrays, threads: int | None = None) -> ItemIndex:
    """The saved index of ``loaded``'s preset, refused unless it was built from this very
    checkpoint over this very pool (``IndexMismatchError`` otherwise)."""
    creative = np.asarray(arrays.cand_creative).astype(np.int64)
    return load_index(
        index_path(paths, loaded.preset),
        expected_checkpoint_version=loaded.checkpoint_version,
        expected={"pool_fingerprint": pool_fingerprint(creative), "dim": int(loaded.model.cfg.d_model)},
        threads=threads,
    )


# --- User vectors ------------------------------------------------------------------------
@dataclass
class UserVectorsBuild:
    """What ``encode_track_users`` wrote: per preset its folder, checkpoint and users per part."""

    presets: dict[str, dict[str, Any]]
    users: int  # users encoded, every preset and part together
    seconds: float
    notes: list[str]

    @property
    def users_per_second(self) -> float:
        return self.users / max(self.seconds, 1e-9)


def _encode_users(
    loaded: LoadedModel, inputs_of: Callable[[int, int], dict[str, np.ndarray]], n: int, out: np.ndarray,
    device: torch.device, batch_size: int, logger: Any, what: str,
) -> None:
    started = time.perf_counter()
    for lo in range(0, n, CHUNK_USERS):
        hi = min(n, lo + CHUNK_USERS)
        out[lo:hi] = query_vectors(loaded, inputs_of(lo, hi), device, batch_size)
        elapsed = time.perf_counter() - started
        logger.info(f"'{loaded.preset}': encoded {hi:,}/{n:,} {what} users ({hi / max(elapsed, 1e-9):,.0f} users/s)")


def comparison_preset(settings: Any) -> str | None:
    """The official-baseline preset the report compares with, unless it is the configured one."""
    name = settings.evaluation.baseline_preset
    return name if name and Path(name).stem != Path(settings.training.preset).stem else None


def configured_predict_file(settings: Any) -> Path | None:
    """The predict_seq.jsonl the submission is for: the local source's, when it has one."""
    return find_predict_file(settings.local_path) if settings.source == "local" else None


def encode_track_users(paths: TrackPaths, settings: TaacSettings, *, logger: Any = None) -> UserVectorsBuild:
    """Encode every holdout user (and every user of the local source's predict_seq.jsonl) with
    the configured preset's checkpoint, and with the baseline preset's when it exists, into
    ``<root>/<track>/vectors/<preset>/`` (see models/user_vectors.py)."""
    logger = logger or log
    es = settings.evaluation
    started = time.perf_counter()
    device = compute_device(settings)
    arrays = track_arrays(paths, settings, logger)
    n_hold = int(arrays.meta["num_holdout"])
    predict_file = configured_predict_file(settings)
    predict = read_predict_inputs(predict_file, arrays, settings=settings) if predict_file is not None else None
    fingerprint = file_fingerprint(predict_file) if predict_file is not None else None
    notes: list[str] = []
    presets = [settings.training.preset]
    baseline = comparison_preset(settings)
    if baseline and checkpoint_path(paths, baseline).is_file():
        presets.append(baseline)
    written: dict[str, dict[str, Any]] = {}
    total = 0
    for preset in presets:
        try:
            loaded = load_model(paths, preset, arrays, device)
        except CheckpointMismatchError as error:
            if preset == settings.training.preset:
                raise
            notes.append(f"The '{preset}' preset was left out: {error}")
            logger.warning(str(error))
            continue
        for warning in loaded.warnings:
            logger.warning(warning)
        dim = int(loaded.model.cfg.d_model)
        folder = vectors_path(paths, loaded.preset)
        meta = {"checkpoint_version": loaded.checkpoint_version, "arrays_data_version": arrays.data_version,
                "preset": loaded.preset, "dim": dim, "actions": list(loaded.actions)}
        with write_user_vectors(folder, meta) as writer:
            holdout = writer.part(HOLDOUT, n_hold, dim)
            _encode_users(loaded, lambda lo, hi: holdout_batch(arrays, np.arange(lo, hi)), n_hold, holdout, device,
                          es.query_batch_size, logger, "holdout")
            holdout.flush()
            total += n_hold
            if predict is not None:
                out = writer.part(PREDICT, len(predict), dim, path=str(predict.path), fingerprint=fingerprint)
                _encode_users(loaded, predict.slice, len(predict), out, device, es.query_batch_size, logger, "predict_seq")
                out.flush()
                total += len(predict)
        written[loaded.preset] = {"path": str(folder), "checkpoint_version": loaded.checkpoint_version,
                                  "holdout": n_hold, "predict": len(predict) if predict is not None else 0}
    seconds = time.perf_counter() - started
    logger.info(f"user vectors of {', '.join(written)} written in {seconds:.1f}s ({total / max(seconds, 1e-9):,.0f} users/s)")
    return UserVectorsBuild(written, total, seconds, notes)


def stored_queries(paths: Any, loaded: LoadedModel, arrays: Arrays, part: str = HOLDOUT,
                   fingerprint: str | None = None) -> np.ndarray:
    """The user vectors ``loaded`` encoded for ``part`` (refused unless they are its own)."""
    return open_user_vectors(
        vectors_path(paths, loaded.preset), part, checkpoint_version=loaded.checkpoint_version,
        arrays_data_version=arrays.data_version, dim=int(loaded.model.cfg.d_model), fingerprint=fingerprint,
    )


# --- Evaluation --------------------------------------------------------------------------
@dataclass
class ScoringSetup:
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


def _scoring_setup(paths: Any, settings: Any, logger: Any, *, require_holdout: bool = True) -> ScoringSetup:
    """The arrays, the configured checkpoint and the index built from it, checked together."""
    device = compute_device(settings)
    arrays = track_arrays(paths, settings, logger)
    loaded = load_model(paths, settings.training.preset, arrays, device)
    index = open_track_index(paths, loaded, arrays, settings.retrieval.threads)
    n_hold = int(arrays.meta["num_holdout"])
    if n_hold == 0 and require_holdout:
        raise EvaluationError(f"{paths.warehouse}: the holdout table is empty: no user to score")
    creative = np.asarray(arrays.cand_creative).astype(np.int64)
    released = released_mask(arrays)
    backend = search_backend(settings, device, index.spec)
    logger.info(f"searching {index.spec.describe()} with {backend}; released pool: "
                f"{len(creative) if released is None else int(released.sum()):,} of {len(creative):,} candidates")
    return ScoringSetup(device, arrays, loaded, index, creative, pool_positions(arrays), n_hold, released,
                        PoolSearch.open(index, backend, device, released))


@dataclass
class Evaluation:
    files: ReportFiles
    headline: dict[str, dict[str, float]]
    oracle_share: dict[str, float]
    users: int
    seconds: dict[str, float]
    provenance: dict[str, Any]
    notes: list[str]
    validation: dict[str, Any] | None = None  # the kept checkpoint's validation figures
    targets_outside_pool_share: float = 0.0  # scored targets outside the released pool

    @property
    def search_backend(self) -> str:
        return str(self.provenance["search_backend"])


def kept_validation(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The validation figures of the weights a checkpoint holds (its best validation)."""
    step = ckpt.get("weights_step", ckpt.get("step"))
    return next((e for e in reversed(ckpt.get("evals") or []) if e.get("step") == step), None)


def _oracle_truth(paths: Any, settings: Any) -> Any:
    if settings.source != "synthetic":
        return None
    from taac_dagster.sources.synthetic import GROUND_TRUTH_DIR, load_ground_truth

    folder = Path(paths.raw_for("synthetic")) / GROUND_TRUTH_DIR
    return load_ground_truth(folder) if folder.is_dir() else None


def _baseline(paths: Any, settings: Any, arrays: Arrays, device: torch.device,
              notes: list[str], logger: Any) -> tuple[LoadedModel, PoolSearch, np.ndarray] | None:
    """The official-baseline preset, scored like the model, when its checkpoint (and its user
    vectors) exist."""
    name = comparison_preset(settings)
    if name is None:
        return None
    if not checkpoint_path(paths, name).is_file():
        notes.append(f"No checkpoint of the '{name}' preset: train it with TAAC_TRAINING__PRESET={name} to see it here.")
        return None
    try:
        loaded = load_model(paths, name, arrays, device)
        queries = stored_queries(paths, loaded, arrays)
    except (CheckpointMismatchError, UserVectorsMismatchError) as error:
        notes.append(f"The '{name}' preset was left out: {error}")
        logger.warning(str(error))
        return None
    index, recall, _, _ = index_model_pool(loaded, arrays, settings, device, logger, {})
    pool_search = PoolSearch.open(index, search_backend(settings, device, index.spec), device, released_mask(arrays))
    notes.append(
        f"The '{name}' preset ({loaded.checkpoint_version}) is searched with {pool_search.describe()} "
        f"({pool_search.backend}), recall@10 {recall:.4f}."
    )
    return loaded, pool_search, queries


def _weighted_targets(
    arrays: Arrays, rows: np.ndarray, position: np.ndarray, relevance: dict[int, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Padded target positions and their relevance weights for the weighted metrics. A target
    that is no candidate (a later click on an item outside the pool) is a miss that still
    weighs: its position is ``OUTSIDE_POOL``, never a list entry and not the padding."""
    targets = np.asarray(arrays.hold_targets[rows]).astype(np.int64)
    actions = np.asarray(arrays.hold_target_actions[rows]).astype(np.int64)
    pad = targets == 0
    target_pos = np.where(pad, PAD, np.where(position[targets] >= 0, position[targets], OUTSIDE_POOL))
    weights = relevance_weights(np.where(pad, PAD, actions), relevance)
    return target_pos, weights


# The scoring loop: one chunk of users at a time, every method of the table on each chunk.
@dataclass
class EvaluationRun:
    """What scoring reads: the checked setup, the users scored and the comparison rows' inputs."""

    settings: Any
    track: Track
    setup: ScoringSetup
    rows: np.ndarray  # the holdout rows scored (all, or a sample of max_users)
    queries: np.ndarray  # the model's user vectors of every holdout row (user_vectors, memory-mapped)
    baseline: tuple[LoadedModel, PoolSearch, np.ndarray] | None  # the official-baseline preset, when trained
    truth: Any  # the generator's ground truth (synthetic data only), else None
    popular: np.ndarray  # released pool positions, most popular first
    pool_item_ids: np.ndarray  # pool position -> item id (0: a row past the id table)
    notes: list[str]

    @property
    def methods(self) -> list[str]:
        return [name for name, method in SCORING_METHODS.items() if method.applies(self)]


@dataclass
class UserChunk:
    """One chunk of holdout users, as every scoring method sees it."""

    rows: np.ndarray  # holdout rows
    inputs: dict[str, np.ndarray]  # model inputs (``holdout_batch``)
    queries: np.ndarray  # the model's user vectors
    history: np.ndarray | None  # pool positions of the history items (None: history filter off)
    exclude_ids: np.ndarray | None  # the same as creative ids, for the index


def _model_top_k(run: EvaluationRun, chunk: UserChunk) -> np.ndarray:
    return run.setup.search.top_k(chunk.queries, chunk.exclude_ids)


def _model_extended_top_k(run: EvaluationRun, chunk: UserChunk) -> np.ndarray:
    return run.setup.search.top_k(chunk.queries, chunk.exclude_ids, extended=True)


def _popularity_top_k(run: EvaluationRun, chunk: UserChunk) -> np.ndarray:
    pool_pos = np.arange(len(run.setup.creative))
    return popularity_topk(run.popular, pool_pos, len(chunk.rows), K, exclude=chunk.history)


def _baseline_top_k(run: EvaluationRun, chunk: UserChunk) -> np.ndarray:
    assert run.baseline is not None
    _, b_search, b_queries = run.baseline
    return b_search.top_k(np.ascontiguousarray(b_queries[chunk.rows]), chunk.exclude_ids)


def _oracle_top_k(run: EvaluationRun, chunk: UserChunk) -> np.ndarray:
    arrays = run.setup.arrays
    prev_rows = chunk.inputs["items"][:, -1]
    prev = np.where(prev_rows < int(arrays.meta["id_rows"]), prev_rows, 0)
    users = np.asarray(arrays.hold_users[chunk.rows]).astype(np.int64)  # the user's id, not its feature rows
    pool_pos = run.setup.released_positions
    return oracle_topk(run.truth, users, prev, run.pool_item_ids[pool_pos], K, pool_ids=pool_pos,
                       exclude=chunk.history)


@dataclass(frozen=True)
class ScoringMethod:
    """A row of the report: the top-K pool positions it recommends to a chunk of users."""

    top_k: Callable[[EvaluationRun, UserChunk], np.ndarray]
    applies: Callable[[EvaluationRun], bool] = lambda run: True
    timer: str = ""  # the phase of ``Evaluation.seconds`` its time counts in (default: the method's name)


# The report's rows, in order. Adding a method is one entry here. Every row recommends from
# the released pool but ``model_extended``: the model on the whole index, targets the warehouse
# added included (only when there are some).
EXTENDED = "model_extended"
SCORING_METHODS: dict[str, ScoringMethod] = {
    "model": ScoringMethod(_model_top_k, timer="search"),
    EXTENDED: ScoringMethod(_model_extended_top_k, applies=lambda run: run.setup.released is not None,
                            timer="search_extended"),
    "popularity": ScoringMethod(_popularity_top_k),
    "baseline": ScoringMethod(_baseline_top_k, applies=lambda run: run.baseline is not None),
    "oracle": ScoringMethod(_oracle_top_k, applies=lambda run: run.truth is not None),
}


@dataclass
class UserScores:
    """Per-method ranks of every scored user's target (and the weighted figures on 10M)."""

    ranks: dict[str, np.ndarray]
    weighted: dict[str, dict[str, np.ndarray]]  # method -> w_hr@10 / w_ndcg@10 per user (10M only)
    seconds: dict[str, float]


def _evaluation_run(paths: Any, settings: Any, logger: Any) -> EvaluationRun:
    """The checked setup, the users to score and every comparison method's inputs."""
    es, rs = settings.evaluation, settings.retrieval
    setup = _scoring_setup(paths, settings, logger)
    notes = list(setup.loaded.warnings)
    rows = sample_rows(setup.n_hold, es.max_users, rs.seed) if es.max_users else np.arange(setup.n_hold)
    queries = stored_queries(paths, setup.loaded, setup.arrays)
    baseline = _baseline(paths, settings, setup.arrays, setup.device, notes, logger)
    cand_rows = np.asarray(setup.arrays.cand_rows).astype(np.int64)
    return EvaluationRun(
        settings=settings, track=get_track(paths.track), setup=setup, rows=rows, queries=queries, baseline=baseline,
        truth=_oracle_truth(paths, settings),
        popular=released_popularity(setup.arrays, setup.loaded.actions, setup.released),
        pool_item_ids=np.where(cand_rows < int(setup.arrays.meta["id_rows"]), cand_rows, 0), notes=notes,
    )


def released_popularity(arrays: Arrays, actions: tuple[int, ...], released: np.ndarray | None) -> np.ndarray:
    """``popularity_order`` restricted to the released pool."""
    order = popularity_order(arrays, actions)
    return order if released is None else order[released[order]]


def targets_outside_pool(run: EvaluationRun) -> np.ndarray:
    """Per scored user: its target is not in the released pool (a miss in every released row)."""
    target = run.setup.position[np.asarray(run.setup.arrays.hold_target[run.rows]).astype(np.int64)]
    if run.setup.released is None:
        return target < 0
    return (target < 0) | ~run.setup.released[np.maximum(target, 0)]


def _user_chunk(run: EvaluationRun, rows: np.ndarray) -> UserChunk:
    """The chunk's model inputs, its user vectors (read, not encoded) and its history filter."""
    setup, es = run.setup, run.settings.evaluation
    inputs = holdout_batch(setup.arrays, rows)
    queries = np.ascontiguousarray(run.queries[rows])
    history = setup.position[inputs["items"]] if es.exclude_history else None
    exclude_ids = _as_ids(history, setup.creative) if history is not None else None
    return UserChunk(rows, inputs, queries, history, exclude_ids)


def _score_users(run: EvaluationRun, logger: Any, started: float) -> UserScores:
    """Every method's top-10 for every scored user, chunk by chunk, ranked against the targets."""
    setup, track = run.setup, run.track
    arrays, position, n, methods = setup.arrays, setup.position, len(run.rows), run.methods
    weighted, relevance = track.weighted, dict(track.relevance)  # 10M: conversions weigh 2.5
    ranks = {m: np.empty(n, np.int64) for m in methods}
    w_user = {m: {"w_hr@10": np.empty(n), "w_ndcg@10": np.empty(n)} for m in methods} if weighted else {}
    logger.info(f"evaluating {n:,} holdout users against {len(setup.released_positions):,} released of "
                f"{len(setup.creative):,} candidates ({setup.search.describe()}, {setup.search.backend}), "
                f"methods {methods}, history filter {'on' if run.settings.evaluation.exclude_history else 'off'}")
    timer = {"inputs": 0.0, **{SCORING_METHODS[m].timer or m: 0.0 for m in methods}}
    for lo in range(0, n, CHUNK_USERS):
        rows = run.rows[lo : lo + CHUNK_USERS]
        hi = lo + len(rows)
        t = time.perf_counter()
        chunk = _user_chunk(run, rows)
        timer["inputs"] += time.perf_counter() - t
        target = position[np.asarray(arrays.hold_target[rows]).astype(np.int64)]
        if weighted:
            t_pos, t_w = _weighted_targets(arrays, rows, position, relevance)
        for m in methods:
            t = time.perf_counter()
            top = SCORING_METHODS[m].top_k(run, chunk)
            timer[SCORING_METHODS[m].timer or m] += time.perf_counter() - t
            ranks[m][lo:hi] = target_ranks(top, target)
            if weighted:
                w_hr, w_nd = weighted_per_user(top, t_pos, t_w, K)
                w_user[m]["w_hr@10"][lo:hi], w_user[m]["w_ndcg@10"][lo:hi] = w_hr, w_nd
        done = time.perf_counter() - started
        logger.info(f"scored {hi:,}/{n:,} users ({hi / max(done, 1e-9):,.0f} users/s so far)")
    return UserScores(ranks, w_user, {k: round(v, 3) for k, v in timer.items()})


def _headline(scores: UserScores) -> dict[str, dict[str, float]]:
    """The report's headline figures per method (weighted ones on 10M)."""
    weighted_means = {}
    for m, per_user in scores.weighted.items():
        whr, wnd = float(per_user["w_hr@10"].mean()), float(per_user["w_ndcg@10"].mean())
        weighted_means[m] = {"w_hr@10": whr, "w_ndcg@10": wnd, "w_score": float(score(whr, wnd))}
    return headline_figures(scores.ranks, K, weighted=weighted_means)


def _slice_table(run: EvaluationRun, scores: UserScores) -> Any:
    """Figures per slice: history length, target popularity, cold vs warm target, target action."""
    arrays, position, rows = run.setup.arrays, run.setup.position, run.rows
    hold_items = np.asarray(arrays.hold_items[rows])
    target_rows = np.asarray(arrays.hold_target[rows]).astype(np.int64)
    target_popularity = np.asarray(arrays.item_counts)[target_rows].sum(axis=1)
    target_cold = np.asarray(arrays.cand_cold)[position[target_rows]] | (target_popularity == 0)
    slices = slice_frame(
        (hold_items != 0).sum(axis=1), target_popularity, target_cold,
        np.asarray(arrays.hold_target_action[rows]).astype(np.int64),
    )
    return slice_metrics(slices, scores.ranks, K, per_user=scores.weighted or None)


def _training_curves(run: EvaluationRun) -> dict[str, list[tuple[int, float]]] | None:
    curves = {"model": [(p["step"], p["loss"]) for p in loss_curve(run.setup.loaded.ckpt.get("losses") or [])]}
    if run.baseline:
        curves["baseline"] = [(p["step"], p["loss"]) for p in loss_curve(run.baseline[0].ckpt.get("losses") or [])]
    return curves if any(curves.values()) else None


def _pool_note(run: EvaluationRun, outside_share: float) -> str:
    setup = run.setup
    released, total = len(setup.released_positions), len(setup.creative)
    if setup.released is None:
        return (f"Every row recommends from the released pool ({total:,} candidates); "
                f"{100 * outside_share:.1f}% of the targets are outside it.")
    return (f"Every row but 'model (pool + missing targets)' recommends from the released pool ({released:,} of "
            f"{total:,} candidates; the other {total - released:,} are holdout targets the warehouse added): "
            f"{100 * outside_share:.1f}% of the targets are outside it and count as misses, as on the leaderboard. "
            "'model (pool + missing targets)' searches the whole pool (an optimistic local figure).")


def _closing_notes(run: EvaluationRun, outside_share: float) -> list[str]:
    es, notes = run.settings.evaluation, [_pool_note(run, outside_share)]
    if es.exclude_history:
        notes.append(
            "History filter on: items already in a user's history are never recommended (as in the official evaluation)."
        )
    else:
        notes.append("History filter off: items from a user's history may be recommended.")
    if run.truth is None:
        notes.append("No oracle: the data is not synthetic (the ceiling needs the generator's ground truth).")
    if es.max_users:
        notes.append(f"Scored a deterministic sample of {len(run.rows):,} of the {run.setup.n_hold:,} holdout users "
                     "(TAAC_EVALUATION__MAX_USERS).")
    return notes


def _provenance(paths: Any, run: EvaluationRun, code_version: str, outside_share: float) -> dict[str, Any]:
    settings, setup = run.settings, run.setup
    return {
        "code_version": code_version,
        "track": paths.track,
        "source": settings.source,
        "data_version": setup.arrays.data_version,
        "checkpoint_version": setup.loaded.checkpoint_version,
        "checkpoint": str(setup.loaded.path),
        "preset": setup.loaded.preset,
        "index": setup.search.describe(),
        "search_backend": setup.search.backend,
        "exclude_history": settings.evaluation.exclude_history,
        "users": len(run.rows),
        "candidates": len(setup.creative),
        "released_candidates": len(setup.released_positions),
        "config": {
            "training": settings.training.model_dump(),
            "retrieval": settings.retrieval.model_dump(),
            "evaluation": settings.evaluation.model_dump(),
        },
        "figures": {"index_recall@10": setup.index.metadata.get("recall"),
                    "targets_outside_pool_share": round(outside_share, 6)},
    }


def evaluate_track(paths: TrackPaths, settings: TaacSettings, *, code_version: str = "", logger: Any = None) -> Evaluation:
    """Score every holdout user (see module doc) and write the report under ``paths.reports``."""
    logger = logger or log
    started = time.perf_counter()
    run = _evaluation_run(paths, settings, logger)
    scores = _score_users(run, logger, started)
    headline = _headline(scores)
    outside = float(targets_outside_pool(run).mean()) if len(run.rows) else 0.0
    notes = run.notes + _closing_notes(run, outside)
    provenance = _provenance(paths, run, code_version, outside)
    seconds = {**scores.seconds, "total": round(time.perf_counter() - started, 3)}
    validation = kept_validation(run.setup.loaded.ckpt)
    data = ReportData(
        track=paths.track, headline=headline, slices=_slice_table(run, scores), provenance=provenance,
        training_curve=_training_curves(run), notes=notes, validation=validation,
    )
    files = write_report(paths.reports, data, name=REPORT_NAME)
    logger.info(f"report written to {files.markdown} in {seconds['total']:.1f}s")
    return Evaluation(files, headline, oracle_share(headline), len(run.rows), seconds, provenance, notes, validation,
                      targets_outside_pool_share=outside)


# --- Submission --------------------------------------------------------------------------
def raw_user_ids(warehouse: Path, user_ids: np.ndarray, settings: Any = None) -> np.ndarray:
    """Raw user ids (object array) of user re-ids, from the warehouse's users table; a user
    the indexer does not name keeps its re-id."""
    from taac_dagster.db import connect

    con = connect(warehouse, settings, read_only=True)
    try:
        table = con.execute("SELECT user_id, raw_user_id FROM users WHERE raw_user_id IS NOT NULL").fetchnumpy()
    finally:
        con.close()
    ids = np.asarray(user_ids, dtype=np.int64)
    out = ids.astype(object)
    known = np.asarray(table["user_id"], dtype=np.int64)
    if len(known):
        order = np.argsort(known)
        pos = np.minimum(np.searchsorted(known[order], ids), len(known) - 1)
        found = known[order][pos] == ids
        raw = np.asarray(table["raw_user_id"], dtype=object)[order]
        out[found] = raw[pos[found]]
    return out


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


def submission_for_track(paths: TrackPaths, settings: TaacSettings, *, logger: Any = None, path: Path | None = None,
                         predict_file: Path | None = None) -> dict[str, Any]:
    """Top-10 creative ids per user in the official format, validated and written atomically
    to ``reports/submission.json``. The users are those of ``predict_file`` (default: the local
    source's ``predict_seq.jsonl`` when it has one, whole sequences as histories), else the
    holdout users (histories before their targets). Their vectors come from ``user_vectors``;
    only a predict file passed here that ``user_vectors`` did not encode is encoded now."""
    logger = logger or log
    es = settings.evaluation
    setup = _scoring_setup(paths, settings, logger, require_holdout=False)
    device, arrays, loaded, pool_search = setup.device, setup.arrays, setup.loaded, setup.search
    creative, position = setup.creative, setup.position
    if len(setup.released_positions) < K:
        raise EvaluationError(
            f"{paths.warehouse}: the released candidate pool holds {len(setup.released_positions)} items; a submission "
            f"needs {K} distinct ones per user"
        )
    explicit = predict_file is not None
    predict_file = predict_file or configured_predict_file(settings)
    if predict_file is not None:
        inputs = read_predict_inputs(predict_file, arrays, settings=settings)
        source, n, users = f"predict_seq ({predict_file})", len(inputs), inputs.raw_user_ids
        inputs_of = inputs.slice
        try:
            queries = stored_queries(paths, loaded, arrays, PREDICT, fingerprint=file_fingerprint(predict_file))
        except UserVectorsMismatchError:
            if not explicit:
                raise
            logger.info(f"{predict_file} is not among the encoded user vectors: encoding its {n:,} users")
            queries = np.zeros((n, int(loaded.model.cfg.d_model)), np.float32)
            _encode_users(loaded, inputs_of, n, queries, device, es.query_batch_size, logger, "predict_seq")
        logger.info(f"recommending for the {n:,} users of {predict_file}")
    else:
        n = setup.n_hold
        if n == 0:
            raise EvaluationError(
                f"{paths.warehouse}: the holdout table is empty and there is no {PREDICT_FILE}: no user to recommend for"
            )
        source = "holdout"
        users = raw_user_ids(paths.warehouse, np.asarray(arrays.hold_users).astype(np.int64), settings)
        inputs_of = lambda lo, hi: holdout_batch(arrays, np.arange(lo, hi))  # noqa: E731
        queries = stored_queries(paths, loaded, arrays)
    popular = released_popularity(arrays, loaded.actions, setup.released)  # the released pool only
    lists = np.empty((n, K), np.int64)
    started = time.perf_counter()
    for lo in range(0, n, CHUNK_USERS):
        hi = min(n, lo + CHUNK_USERS)
        history = position[inputs_of(lo, hi)["items"]] if es.exclude_history else None
        exclude = _as_ids(history, creative) if history is not None else None
        top = pool_search.top_k(np.ascontiguousarray(queries[lo:hi]), exclude)
        lists[lo:hi] = fill_lists(top, popular, history)
        elapsed = time.perf_counter() - started
        logger.info(f"recommended for {hi:,}/{n:,} users ({hi / max(elapsed, 1e-9):,.0f} users/s so far)")
    target = path or Path(paths.reports) / SUBMISSION_FILE
    # Validated against the released pool: a target the warehouse added is never submitted.
    summary = write_submission(target, creative[lists], users, creative[setup.released_positions])
    summary.update({"source": source, "checkpoint_version": loaded.checkpoint_version, "index": pool_search.describe(),
                    "search_backend": pool_search.backend, "released_candidates": len(setup.released_positions),
                    "exclude_history": es.exclude_history})
    logger.info(f"submission for {summary['users']:,} users written to {target}")
    return summary


__all__ = [
    "CheckpointMismatchError",
    "Evaluation",
    "EvaluationError",
    "IndexBuild",
    "StaleCheckpointError",
    "build_track_index",
    "check_checkpoint_fits",
    "encode_track_users",
    "evaluate_track",
    "fill_lists",
    "index_spec_from_settings",
    "open_track_index",
    "popularity_order",
    "raw_user_ids",
    "submission_for_track",
    "vectors_path",
]
