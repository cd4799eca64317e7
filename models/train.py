"""Training loop: presets, optimizers, checkpoints, validation, and the torchrun entry point.

    python -m models.train --config configs/models/default.yaml --data-root data --track 1M
    torchrun --nproc_per_node 2 -m models.train --config configs/models/default.yaml ...

A run is a pure function of (arrays, preset, seed) on CPU: batches are addressed by step
(models/data.py), dropout is re-seeded every step, and the learning rate is computed from the
step, so a run interrupted at step s and resumed from its checkpoint ends with the same weights
as an uninterrupted one.

Optimizers: embedding tables with more rows than ``sparse_threshold`` produce sparse gradients
and are updated row-wise by ``SparseAdam`` (only the rows a batch touched); everything else uses
AdamW. The real-vocabulary shape (millions of id rows) then costs about what the small one does.

Under torchrun each rank builds the same global batch and keeps its slice; the loss is scaled
so that DDP's gradient average equals the gradient of the single-process loss on the global
batch (same trajectory, to float tolerance). Only rank 0 evaluates and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models import distributed
from models.allocator import keep_freed_memory
from models.auto_settings import matmul_gflops, resolve_model_settings, resolve_train_settings
from models.baselines import popularity_order, popularity_topk
from models.data import (
    Arrays,
    BatchMaker,
    NegativeSpec,
    PrepareOptions,
    history_batch,
    load_arrays,
    prepare_arrays,
    released_mask,
    trim_padding,
)
from models.encoder import Encoder, EncoderConfig, ItemTables, count_parameters
from models.losses import NegativeQueue
from models.metrics import retrieval_metrics
from taac_dagster.atomic import atomic_file
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import TaacSettings, model_preset_file, model_preset_name, training_overrides
from taac_dagster.tracks import get_track

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
LAST = "last.pt"
# What only resuming training reads from a checkpoint (dropped by load_encoder).
TRAINING_STATE = ("model", "optim", "negative_queue")
# Fields that change how a run is watched, not what it computes: not part of the config hash.
_NOT_HASHED = {"log_every", "eval_batch", "checkpoint_every", "checkpoint_minutes", "device", "compile", "threads"}
# Fields hashed only when set, so that adding them left the hashes of existing runs unchanged.
_HASHED_WHEN_SET = {"max_minutes"}
# The time budget (TrainConfig.max_minutes): steps before the speed is measured (allocator,
# caches, compilation), steps timed, and the fewest validations a shortened run keeps.
BUDGET_WARMUP_STEPS = 20
BUDGET_WINDOW_STEPS = 20
BUDGET_MIN_VALIDATIONS = 10


@dataclass
class TrainConfig:
    batch_size: int = 256  # global batch (sequences per step, over all ranks)
    # Batches of similar history lengths (see BatchMaker.order): chunks of this many batches
    # are sorted by length. 0: plain shuffling (every batch padded to its longest history).
    length_buckets: int = 0
    # The most epochs. None: as many as it takes to show the model ``budget_sequences``
    # training sequences, between 1 and ``max_auto_epochs`` (a small dataset needs many
    # passes, a large one few); early stopping usually ends the run before.
    epochs: int | None = None
    budget_sequences: int = 4_000_000  # training sequences shown when epochs is unset
    max_auto_epochs: int = 200  # the most epochs that budget may ask for
    max_steps: int | None = None  # overrides epochs
    # Time budget of the training loop in minutes (validations and checkpoints included; None:
    # none). The run times its first steps and plans min(planned steps, steps that fit): the
    # warm-up, the cosine schedule and the validation interval follow the new length.
    max_minutes: float | None = None
    # Early stopping: stop after ``patience`` validations without a better validation score
    # (0: never early); the best weights are what the run returns and saves.
    patience: int = 10
    lr: float = 1e-3  # AdamW's peak learning rate
    sparse_lr: float | None = None  # SparseAdam's learning rate (None: lr)
    weight_decay: float = 0.0  # AdamW, matrices only
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW's (and SparseAdam's) betas
    warmup_steps: int | None = None  # None: warmup_fraction of the planned steps
    warmup_fraction: float = 0.0  # linear warm-up over this share of the planned steps
    schedule: str = "constant"  # constant | cosine (to 10% of lr)
    grad_clip: float = 0.0  # max norm of the dense gradients (0: off)
    # Loss weight per target action type; an action of weight 0 is never a training target.
    action_weights: dict[int, float] = field(default_factory=lambda: {0: 1.0, 1: 1.0, 2: 2.5})
    in_batch_negatives: int = 0  # target items of other positions of the global batch used as negatives
    # Sampled losses: distinct items of the batch used as negatives (all up to this many, else a
    # uniform subset of this size); 0: none.
    batch_negatives: int = 0
    sampled_negatives: int = 0  # items drawn by the sampler (below) as negatives, shared by the batch
    # Uniform draws from the candidate pool (cold items included) added to the negatives: the
    # items retrieval ranks that training sequences may never hold. 0: none.
    pool_negatives: int = 0
    # InfoNCE: the negatives of the last this many batches (item-tower outputs, detached) join
    # the batch's own; the bank is in the checkpoint, so a resumed run sees the same one. 0: off.
    queue_batches: int = 0
    per_position_negatives: int = 0  # the official baseline's BCE: one sampled item per position
    per_position_pool: int = 4096  # ... drawn from a shared pool of this many samples (0: independent)
    sampler: str = "popularity"  # popularity | uniform
    sampler_alpha: float = 1.0  # popularity sampler: probability ~ count ** alpha
    logq: bool = True  # subtract log Q (the sampling probability) from the logits of sampled negatives
    logq_positive: bool = True  # ... and from the positive's, whether or not it was drawn
    retrieval_actions: tuple[int, ...] | None = None  # None: the track's target actions
    # A catalogue of at most this many item rows is trained with the full softmax (every item a
    # negative) when the model's loss is "auto"; a larger one with sampled negatives (InfoNCE).
    full_softmax_items: int = 100_000
    # ... and whose three products are expected to take at most this many seconds a step on
    # the training device (measured there; models/auto_settings.py).
    softmax_step_seconds: float = 1.0
    # On a GPU: the global batch (None: batch_size), the learning rate scaled by the square
    # root of the ratio (models/auto_settings.py resolve_train_settings).
    cuda_batch_size: int | None = None
    # Memory for the item id table with its Adam moments (weights + 2 moments, float32) when
    # the model's id_buckets is "auto"; a larger vocabulary is hashed into what fits.
    max_id_table_bytes: int = 6 << 30
    seed: int = 0  # weights, batch order and negatives: the same seed trains the same model
    val_users: int = 4096  # validation users (at most the arrays' validation split)
    # Validation ranks like the report: the user's history items excluded (the report's
    # TAAC_EVALUATION__EXCLUDE_HISTORY is passed in by train_track), so the figures compare.
    exclude_history: bool = True
    # Steps between validations. None: once per epoch, and at least every ``eval_every_max``
    # steps; 0: at the end only.
    eval_every: int | None = None
    eval_every_max: int = 2000  # the longest gap between validations (steps)
    eval_batch: int = 512  # users encoded per pass while validating
    log_every: int = 10  # steps between progress lines
    checkpoint_every: int = 0  # steps between checkpoints (0: by time only)
    checkpoint_minutes: float = 5.0  # a checkpoint at least this often (0: by steps only); always one at the end
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile of the Transformer blocks on CUDA (Encoder.compile_blocks)
    bf16: bool = True  # bf16 autocast on CUDA
    threads: int | None = None  # torch CPU threads (None: the cores the load average leaves free)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown train settings {sorted(unknown)}; known: {sorted(known)}")
        data = dict(data)
        if "action_weights" in data:
            data["action_weights"] = {int(k): float(v) for k, v in data["action_weights"].items()}
        for key in ("betas", "retrieval_actions"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass
class Preset:
    name: str
    model: dict[str, Any]  # EncoderConfig architecture fields
    train: TrainConfig


def load_preset(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Preset:
    """A preset from configs/models/<name>.yaml (or a path): ``model:`` and ``train:`` sections.
    ``overrides`` = {"model": {...}, "train": {...}} on top."""
    path = model_preset_file(name_or_path)
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    overrides = overrides or {}
    model = {**(data.get("model") or {}), **(overrides.get("model") or {})}
    train = {**(data.get("train") or {}), **(overrides.get("train") or {})}
    return Preset(model_preset_name(path), model, TrainConfig.from_dict(train))


def checkpoint_version(digest: str, data_version: str, step: int) -> str:
    """Names what a checkpoint holds: config, data and step (a CPU run is deterministic, so the
    same three give the same weights). Downstream indexes record it to refuse stale vectors."""
    return f"{digest}-{data_version}-s{step}"


def config_hash(model_cfg: EncoderConfig, tc: TrainConfig) -> str:
    train = {k: v for k, v in asdict(tc).items() if k not in _NOT_HASHED and not (k in _HASHED_WHEN_SET and v is None)}
    text = json.dumps({"model": model_cfg.to_dict(), "train": train}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# --- Pieces of the loop ---------------------------------------------------------------------


def cpu_threads(requested: int | None) -> int:
    """Torch threads for a CPU run: ``requested``, or the cores the 1-minute load average leaves
    free (at least one). On a shared machine two OpenMP threads, one of them descheduled,
    spin at every parallel region: measured here 3x slower than one thread, not 1.3x faster."""
    if requested:
        return requested
    cores = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def planned_epochs(tc: TrainConfig, num_sequences: int) -> int:
    """The epoch bound: ``tc.epochs``, or enough passes to show ``budget_sequences`` sequences."""
    if tc.epochs is not None:
        return int(tc.epochs)
    return int(min(tc.max_auto_epochs, max(1, math.ceil(tc.budget_sequences / max(1, num_sequences)))))


def total_steps(tc: TrainConfig, maker: BatchMaker) -> int:
    if tc.max_steps is not None:
        return int(tc.max_steps)
    return int(planned_epochs(tc, maker.arrays.num_sequences) * maker.steps_per_epoch)


def validation_interval(tc: TrainConfig, maker: BatchMaker) -> int:
    """Steps between validations (0: at the end only)."""
    if tc.eval_every is not None:
        return int(tc.eval_every)
    return int(max(1, min(maker.steps_per_epoch, tc.eval_every_max)))


def warmup_steps(tc: TrainConfig, steps: int) -> int:
    return int(tc.warmup_steps) if tc.warmup_steps is not None else int(round(tc.warmup_fraction * steps))


def budget_plan(
    *, remaining: float, step_seconds: float, validation_seconds: float, done: int, planned: int, interval: int,
    min_validations: int = BUDGET_MIN_VALIDATIONS,
) -> tuple[int, int]:
    """(steps, validation interval) for a run at step ``done`` with ``remaining`` seconds left:
    the most steps, up to ``planned``, whose training and validations (one every ``interval``
    steps, and one at the end, ``validation_seconds`` each) fit. A shortened run validates at
    least every 1/``min_validations`` of its length (``interval`` 0, at the end only, stays)."""
    steps, every = planned, interval
    for _ in range(3):  # the interval depends on the length and the length on the interval
        per_step = step_seconds + (validation_seconds / every if every else 0.0)
        fit = int(max(0.0, remaining - validation_seconds) // per_step) if per_step > 0 else planned
        steps = max(done, min(planned, done + fit))
        every = min(interval, max(1, steps // min_validations)) if interval and steps < planned else interval
    return steps, every


def lr_at(step: int, tc: TrainConfig, steps: int) -> float:
    warmup = warmup_steps(tc, steps)
    if warmup and step < warmup:
        return tc.lr * (step + 1) / warmup
    if tc.schedule == "cosine":
        progress = (step - warmup) / max(1, steps - warmup)
        return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    return tc.lr


def make_optimizers(model: Encoder, tc: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    """SparseAdam for tables with sparse gradients (row-wise updates), AdamW for the rest;
    weight decay on dense matrices only (not on norms, biases or embeddings)."""
    sparse_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}
    sparse = [p for p in model.parameters() if id(p) in sparse_ids]
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    decay = [p for p in model.parameters() if id(p) not in embedding_ids and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if id(p) not in sparse_ids and (id(p) in embedding_ids or p.dim() < 2)]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizers: dict[str, torch.optim.Optimizer] = {"dense": torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas)}
    if sparse:
        optimizers["sparse"] = torch.optim.SparseAdam(sparse, lr=tc.sparse_lr or tc.lr, betas=tc.betas)
    return optimizers


# Batches built ahead of a GPU step, by as many worker threads (numpy's indexing and sorting
# release the GIL): the step never waits for its batch.
BATCHES_AHEAD = 4


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type != "cuda":
        return {k: torch.as_tensor(v) for k, v in batch.items()}
    return {k: pinned(v).to(device, non_blocking=True) for k, v in batch.items()}


def pinned(value: Any) -> torch.Tensor:
    """``value`` as a tensor in page-locked memory (a plain tensor where there is no GPU)."""
    tensor = torch.as_tensor(value)
    if not torch.cuda.is_available() or tensor.is_pinned():
        return tensor
    return tensor.pin_memory()


def batches(
    maker: BatchMaker, start: int, stop: int, ahead: int, *, pin: bool = False,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(step, batch) for start <= step < stop, in order. With ``ahead`` > 0, ``ahead`` worker
    threads build the next batches while the device runs the current step, each already in
    pinned memory with ``pin`` (so its copy to the GPU is asynchronous); on a CPU the batches
    are built inline (they cost ~1% of a step and the cores are busy)."""
    make = (lambda step: {k: pinned(v) for k, v in maker.batch(step).items()}) if pin else maker.batch
    if ahead <= 0:
        for step in range(start, stop):
            yield step, make(step)
        return
    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="batches") as pool:
        queued: deque = deque()
        next_step = start
        try:
            while next_step < stop and len(queued) < ahead:
                queued.append((next_step, pool.submit(make, next_step)))
                next_step += 1
            while queued:
                step, future = queued.popleft()
                batch = future.result()  # a worker's exception surfaces here
                if next_step < stop:
                    queued.append((next_step, pool.submit(make, next_step)))
                    next_step += 1
                yield step, batch
        finally:
            for _, future in queued:
                future.cancel()


def negative_spec(tc: TrainConfig) -> NegativeSpec:
    return NegativeSpec(
        in_batch=tc.in_batch_negatives,
        batch_items=tc.batch_negatives,
        sampled=tc.sampled_negatives,
        pool=tc.pool_negatives,
        per_position=tc.per_position_negatives,
        per_position_pool=tc.per_position_pool,
        sampler=tc.sampler,
        alpha=tc.sampler_alpha,
        logq=tc.logq,
        logq_positive=tc.logq_positive,
    )


def default_retrieval_actions(track: str) -> tuple[int, ...]:
    return tuple(get_track(track).target_priority)


@torch.no_grad()
def evaluate(
    model: Encoder,
    arrays: Arrays,
    index: np.ndarray,
    actions: tuple[int, ...],
    *,
    device: torch.device,
    split: str = "val",
    exclude_history: bool = True,
    k: int = 10,
    batch_size: int = 512,
) -> dict[str, float]:
    """HR@k / NDCG@k / score of the model on rows ``index`` of a split (``val``: validation
    targets, ``hold``: test targets) against the released candidate pool, with the report's
    history filter, next to the report's popularity ranking under the same filter."""
    was_training = model.training
    model.eval()
    # Users in order of history length, so that each trimmed chunk holds histories of one size.
    index = np.asarray(index)[np.argsort((history_batch(arrays, split, index)["items"] > 0).sum(1), kind="stable")]
    cand_rows = np.asarray(arrays.cand_rows).astype(np.int64)
    position = np.full(arrays.meta["num_item_rows"], -1, np.int64)
    position[cand_rows] = np.arange(len(cand_rows))
    targets = position[np.asarray(arrays.a[f"{split}_target"][index]).astype(np.int64)]
    # Ranked like the report: from the released pool only (the holdout targets the warehouse
    # added to the pool are not candidates, so validation is not flattered by them).
    released = released_mask(arrays)
    hidden = torch.from_numpy(np.flatnonzero(~released)).to(device) if released is not None else None
    keys = torch.cat([
        model.item_vectors(torch.from_numpy(cand_rows[i : i + 65_536]).to(device))
        for i in range(0, len(cand_rows), 65_536)
    ])
    chunk = max(1, min(batch_size, (1 << 26) // max(1, len(cand_rows))))
    topk, histories = [], []
    for i in range(0, len(index), chunk):
        batch = trim_padding(history_batch(arrays, split, index[i : i + chunk]))
        scores = model.user_vectors(to_device(batch, device), actions) @ keys.T
        if hidden is not None:
            scores[:, hidden] = -torch.inf
        history = position[batch["items"]]
        histories.append(np.pad(history, ((0, 0), (arrays.meta["max_len"] - history.shape[1], 0)), constant_values=-1))
        if exclude_history:
            rows, cols = np.nonzero(history >= 0)
            scores[torch.from_numpy(rows).to(device), torch.from_numpy(history[rows, cols]).to(device)] = -torch.inf
        topk.append(scores.topk(min(k, scores.shape[1]), dim=1).indices.cpu().numpy())
    model.train(was_training)
    result = retrieval_metrics(np.concatenate(topk), targets, k)
    popular = popularity_order(arrays, actions)
    if released is not None:
        popular = popular[released[popular]]
    exclude = np.concatenate(histories) if exclude_history else None
    pool = np.arange(len(cand_rows))
    baseline = retrieval_metrics(popularity_topk(popular, pool, len(targets), k, exclude=exclude), targets, k)
    result.update({f"popularity_{key}": value for key, value in baseline.items()})
    result["users"] = int(len(index))
    return result


# --- Checkpoints ------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
    return path


def load_encoder(
    path: str | Path, arrays: Arrays | None = None, device: str | torch.device = "cpu"
) -> tuple[Encoder, dict[str, Any]]:
    """Rebuild the model from a checkpoint alone (its config is inside); attach the item tables
    of ``arrays`` (default: the arrays the checkpoint was trained on) when they can be found.

    The returned dict is the checkpoint without its training state (``TRAINING_STATE``: the
    optimizer moments, the negative queue, the weights themselves, now in the model): the file
    is memory-mapped, so what a consumer never reads is never paged in. At the 1M shape the
    optimizer state is most of an ~8 GB checkpoint; kept, it held that much in every step that
    scores (measured growth in docs/scaling.md)."""
    # weights_only: plain containers and tensors only; mmap: read lazily from the file.
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    model = Encoder(EncoderConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    ckpt = {key: value for key, value in ckpt.items() if key not in TRAINING_STATE}
    if isinstance(ckpt.get("early_stopping"), dict):
        ckpt["early_stopping"] = {k: v for k, v in ckpt["early_stopping"].items() if k != "best_model"}
    if arrays is None and ckpt.get("arrays_dir") and Path(ckpt["arrays_dir"], "meta.json").is_file():
        arrays = load_arrays(ckpt["arrays_dir"])
    if arrays is not None:
        model.attach(ItemTables.from_arrays(arrays).to(device))
    return model, ckpt


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    losses: list[float]
    evals: list[dict[str, Any]]
    metrics: dict[str, float]
    samples_per_second: float
    tokens_per_second: float
    seconds: float
    checkpoint: Path | None
    params: dict[str, int]
    config_hash: str
    model_config: dict[str, Any]
    best_step: int = 0  # the step whose weights were kept (the best validation)
    stopped_early: bool = False
    planned_steps: int = 0  # the run's length: the time budget's plan when it shortened the run
    # The settings the run trained with (the device's batch and learning rate decided).
    train_config: dict[str, Any] = field(default_factory=dict)
    checkpoint_version: str = ""  # what the checkpoint's weights are (checkpoint_version)

    def loss_curve(self, points: int = 200) -> list[dict[str, float]]:
        return loss_curve(self.losses, points)


def loss_curve(losses: list[float], points: int = 200) -> list[dict[str, float]]:
    """A per-step loss list averaged into at most ``points`` buckets of steps."""
    if not losses:
        return []
    edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).astype(int)
    return [
        {"step": int(hi), "loss": round(float(np.mean(losses[lo:hi])), 5)}
        for lo, hi in zip(edges[:-1], edges[1:])
        if hi > lo
    ]


# --- The loop ---------------------------------------------------------------------------------


def train(
    arrays: Arrays,
    preset: Preset,
    *,
    track: str,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
    info: distributed.DistInfo | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> TrainResult:
    """Train (or resume) one model on prepared arrays; returns curves, figures and the
    checkpoint path. ``stop_after`` stops at that step as if interrupted (checkpoint written).
    ``clock`` (seconds) times the run for the time budget and the periodic checkpoints."""
    tc = preset.train
    info = info or distributed.DistInfo(device=distributed.pick_device(tc.device))
    emit = on_log or (lambda record: log.info(json.dumps(record)))
    threads_before = torch.get_num_threads()
    if info.device.type == "cpu":
        torch.set_num_threads(cpu_threads(tc.threads))
        keep_freed_memory()  # the step's activations come back from the heap (models/allocator.py)
    try:
        return _train(arrays, preset, track, checkpoint_dir, resume, emit, stop_after, info, clock)
    finally:
        torch.set_num_threads(threads_before)


@dataclass
class EarlyStopping:
    """Keeps the best validation score, the step and the weights that reached it, and counts
    validations without improvement. Its state travels in checkpoints, so a resumed run stops
    where an uninterrupted one would."""

    patience: int
    best_score: float = -math.inf
    best_step: int = 0
    bad: int = 0
    best_model: dict[str, torch.Tensor] | None = None

    def update(self, step: int, score: float, model: nn.Module) -> bool:
        if score > self.best_score:
            self.best_score, self.best_step, self.bad = score, step, 0
            self.best_model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_step": self.best_step, "bad": self.bad, "best_model": self.best_model}

    def load(self, state: dict[str, Any] | None) -> None:
        if state:
            self.best_score, self.best_step, self.bad = state["best_score"], state["best_step"], state["bad"]
            self.best_model = state.get("best_model")


class Trainer:
    """One training run: model, optimizers, batches, validation, early stopping, checkpoints,
    the time budget."""

    def __init__(
        self, arrays: Arrays, preset: Preset, track: str, checkpoint_dir: Path | None,
        emit: Callable[[dict[str, Any]], None], info: distributed.DistInfo,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        tc = self.tc = resolve_train_settings(preset.train, arrays.meta, info.device)
        self.arrays, self.preset, self.track, self.emit, self.info = arrays, preset, track, emit, info
        self.device = info.device
        self.cfg = EncoderConfig.from_meta(arrays.meta, **resolve_model_settings(
            preset.model, tc, arrays.meta, gflops=self.softmax_speed(preset.model, tc, arrays.meta, info)))
        self.digest = config_hash(self.cfg, tc)
        self.actions = tc.retrieval_actions or default_retrieval_actions(track)
        negatives = negative_spec(tc) if self.cfg.loss != "softmax" else NegativeSpec(logq=False)
        self.maker = BatchMaker(
            arrays, tc.batch_size, seed=tc.seed, action_weights=tc.action_weights,
            negatives=negatives, rank=info.rank, world=info.world, length_buckets=tc.length_buckets,
        )
        self.steps = total_steps(tc, self.maker)
        self.interval = validation_interval(tc, self.maker)
        torch.manual_seed(tc.seed)
        model = self.model = Encoder(self.cfg).to(self.device)
        model.attach(ItemTables.from_arrays(arrays).to(self.device))
        model.negative_queue = NegativeQueue(tc.queue_batches) if tc.queue_batches and self.cfg.loss == "infonce" else None
        if info.distributed and self.device.type == "cuda":
            # NCCL has no sparse all-reduce for DDP: the big tables take dense gradients there.
            for module in model.modules():
                if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                    module.sparse = False
        self.optimizers = make_optimizers(model, tc)
        dense = self.optimizers["dense"].param_groups
        self.dense_params = dense[0]["params"] + dense[1]["params"]
        self.params = count_parameters(model)
        self.val_index = np.arange(min(int(arrays.meta.get("num_val", 0)), tc.val_users))
        self.early = EarlyStopping(tc.patience if len(self.val_index) else 0)
        self.last = checkpoint_dir / LAST if checkpoint_dir is not None else None
        self.start, self.step, self.finished = 0, 0, False
        self.losses: list[float] = []
        self.evals: list[dict[str, Any]] = []
        # The time budget: ``planned`` is the length without it (what a resumed run compares);
        # ``steps`` becomes the budget's plan once the speed is measured (once per run).
        self.clock = clock
        self.planned = self.steps
        self.budget_planned = tc.max_minutes is None
        self.elapsed_before = 0.0  # seconds the run trained in earlier processes (from the checkpoint)
        self.run_started: float | None = None
        self.overhead = 0.0  # seconds this process spent validating and writing checkpoints
        self.validation_seconds: list[float] = []
        self.checkpoint_seconds: list[float] = []
        self.last_checkpoint_at = clock()

    @staticmethod
    def softmax_speed(model: dict[str, Any], tc: TrainConfig, meta: dict[str, Any], info: distributed.DistInfo) -> float | None:
        """The device's measured GFLOP/s on the full softmax's product, when ``loss: auto`` has
        to weigh it (rank 0's figure on every rank, so that all ranks build the same model)."""
        rows = int(meta.get("num_softmax_rows", meta.get("num_item_rows", 0)))
        if model.get("loss", "auto") != "auto" or rows > tc.full_softmax_items:
            return None
        width = int(model.get("d_model", EncoderConfig.d_model))
        return distributed.broadcast_float(matmul_gflops(info.device, width, rows), info)

    # -- checkpoints -------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the last checkpoint of the same config, data and planned length (the
        length without a time budget; a budget's plan, made once, comes from the checkpoint)."""
        if self.last is None or not self.last.is_file():
            return
        ckpt = torch.load(self.last, map_location="cpu", weights_only=True)
        same = ckpt.get("config_hash") == self.digest and ckpt.get("data_version") == self.arrays.data_version
        total = ckpt.get("total_steps")
        same = same and ckpt.get("planned_steps", total) == self.planned and total is not None and ckpt["step"] <= total
        if not same:
            self.emit({"event": "fresh_start", "reason": "the last checkpoint has another config, data or length"})
            return
        self.model.load_state_dict(ckpt["model"])
        if self.model.negative_queue is not None:
            self.model.negative_queue.load(ckpt.get("negative_queue"), self.device)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optim"][name])
        self.start = self.step = ckpt["step"]
        self.losses, self.evals = list(ckpt["losses"]), list(ckpt["evals"])
        self.early.load(ckpt.get("early_stopping"))
        self.finished = bool(ckpt.get("finished"))
        self.steps = int(total)
        self.interval = int(ckpt.get("validate_every", self.interval))
        self.budget_planned = bool(ckpt.get("budget_planned", self.budget_planned))
        self.elapsed_before = float(ckpt.get("elapsed_seconds", 0.0))
        self.emit({"event": "resume", "step": self.start, "finished": self.finished, "checkpoint": str(self.last),
                   "steps": self.steps})

    @property
    def weights_step(self) -> int:
        """The step whose weights the model holds once finished: the best validation's."""
        return self.early.best_step if (self.finished and self.early.best_step > 0) else self.step

    @property
    def version_digest(self) -> str:
        """The config hash, with the length when a time budget shortened the run: the weights
        then depend on the machine's speed as well as on the config."""
        return self.digest if self.steps == self.planned else f"{self.digest}n{self.steps}"

    @property
    def version(self) -> str:
        return checkpoint_version(self.version_digest, self.arrays.data_version, self.weights_step)

    def elapsed(self) -> float:
        """Seconds this run has trained, over every process (since its last checkpoint's)."""
        return self.elapsed_before + (self.clock() - self.run_started if self.run_started is not None else 0.0)

    def state(self) -> dict[str, Any]:
        arrays = self.arrays
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "weights_step": self.weights_step,
            "finished": self.finished,
            "total_steps": self.steps,
            "planned_steps": self.planned,  # without the time budget (what resuming compares)
            "validate_every": self.interval,
            "budget_planned": self.budget_planned,
            "elapsed_seconds": self.elapsed(),
            "track": self.track,
            "preset": self.preset.name,
            "model_config": self.cfg.to_dict(),
            "train_config": asdict(self.tc),
            "config_hash": self.digest,
            "data_version": arrays.data_version,
            "arrays_dir": str(arrays.folder),
            # What the item and user tables meant at training time: checked before scoring.
            "data_shape": {key: arrays.meta[key] for key in ("families", "item_features", "user_sparse", "user_multi")},
            "model": self.model.state_dict(),
            "optim": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "negative_queue": self.model.negative_queue.state() if self.model.negative_queue is not None else None,
            # A finished checkpoint holds the best weights as "model": no second copy.
            "early_stopping": {**self.early.state(), **({"best_model": None} if self.finished else {})},
            "losses": self.losses,
            "evals": self.evals,
            "retrieval_actions": list(self.actions),
            "params": self.params,
            "checkpoint_version": self.version,
        }

    def checkpoint(self) -> None:
        """Write ``last.pt`` (rank 0; atomically: a run killed while writing keeps the previous one)."""
        if self.info.is_main and self.last is not None:
            began = self.clock()
            save_checkpoint(self.last, self.state())
            self.last_checkpoint_at = self.clock()
            spent = self.last_checkpoint_at - began
            self.checkpoint_seconds.append(spent)
            self.overhead += spent
            self.emit({"event": "checkpoint", "step": self.step, "path": str(self.last), "seconds": round(spent, 3)})

    def checkpoint_due(self) -> bool:
        """Every ``checkpoint_every`` steps, and ``checkpoint_minutes`` after the last one (rank 0,
        the writer; the other ranks never stop to flush for it)."""
        tc = self.tc
        if not self.info.is_main or self.last is None:
            return False
        if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
            return True
        return bool(tc.checkpoint_minutes) and self.clock() - self.last_checkpoint_at >= 60 * tc.checkpoint_minutes

    # -- the time budget ---------------------------------------------------------------------
    def probe_validation(self) -> float:
        """Seconds one validation of the current weights takes (its figures are not kept):
        what the budget reserves per validation when the run has not validated yet."""
        if not (self.info.is_main and len(self.val_index)):
            return 0.0
        return self.timed_validation()[1]

    def timed_validation(self) -> tuple[dict[str, float], float]:
        """(figures, seconds) of one validation of the current weights, counted as overhead
        (time the budget's step timing leaves out)."""
        began = self.clock()
        figures = evaluate(self.model, self.arrays, self.val_index, self.actions, device=self.device,
                           exclude_history=self.tc.exclude_history, batch_size=self.tc.eval_batch)
        spent = self.clock() - began
        self.overhead += spent
        return figures, spent

    def plan_budget(self, step_seconds: float) -> None:
        """Shorten the run to what fits in ``max_minutes``: the time spent so far, then
        ``step_seconds`` per step, the validations and the periodic checkpoints (rank 0 plans,
        every rank follows)."""
        tc = self.tc
        steps, interval = float(self.steps), float(self.interval)
        validation = remaining = 0.0
        if self.info.is_main:
            validation = max(self.validation_seconds) if self.validation_seconds else self.probe_validation()
            remaining = 60 * float(tc.max_minutes or 0) - self.elapsed()
            if self.checkpoint_seconds and tc.checkpoint_minutes:  # the share periodic checkpoints take
                write = max(self.checkpoint_seconds)
                remaining *= 60 * tc.checkpoint_minutes / (60 * tc.checkpoint_minutes + write)
            steps, interval = budget_plan(
                remaining=remaining, step_seconds=step_seconds, validation_seconds=validation if len(self.val_index) else 0.0,
                done=self.step, planned=self.steps, interval=self.interval,
            )
        steps, interval = distributed.broadcast_float(steps, self.info), distributed.broadcast_float(interval, self.info)
        before = self.steps
        self.steps, self.interval, self.budget_planned = int(steps), int(interval), True
        self.emit({"event": "budget", "minutes": tc.max_minutes, "step": self.step, "planned_steps": before,
                   "steps": self.steps, "validate_every": self.interval, "step_seconds": round(step_seconds, 5),
                   "validation_seconds": round(validation, 3), "remaining_seconds": round(remaining, 1)})

    # -- steps -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Score the validation split (rank 0) and update early stopping on every rank."""
        score = -math.inf
        if self.info.is_main and len(self.val_index):
            figures, spent = self.timed_validation()
            record = {"step": self.step, **{k: round(v, 5) if isinstance(v, float) else v for k, v in figures.items()}}
            self.evals.append(record)
            score = figures["score"]
            self.validation_seconds.append(spent)
        score = distributed.broadcast_float(score, self.info)
        if math.isfinite(score):
            improved = self.early.update(self.step, score, self.model)
            self.emit({"event": "validation", **(self.evals[-1] if self.evals else {}), "best_step": self.early.best_step,
                       "improved": improved})

    def set_lr(self, step: int) -> float:
        tc = self.tc
        lr = lr_at(step, tc, self.steps)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr if opt is self.optimizers["dense"] else (tc.sparse_lr or tc.lr) * lr / tc.lr
        return lr

    def run(self, net: nn.Module, stop_after: int | None) -> tuple[float, int]:
        """Train from ``self.step`` until the planned steps, early stopping or ``stop_after``;
        returns (seconds, tokens seen). With a time budget, the steps from
        ``BUDGET_WARMUP_STEPS`` to ``+ BUDGET_WINDOW_STEPS`` of this process are timed and the
        run is planned again for what fits (``plan_budget``)."""
        tc, device, info = self.tc, self.device, self.info
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and tc.bf16)
        self.emit({"event": "start", "steps": self.steps, "start": self.start, "batch": self.maker.global_batch,
                   "world": info.world, "device": str(device), "validate_every": self.interval,
                   "patience": self.early.patience, "threads": torch.get_num_threads() if device.type == "cpu" else None,
                   "params": self.params, "sequences": self.arrays.num_sequences, "max_minutes": tc.max_minutes})
        self.model.train()
        started = time.perf_counter()
        self.run_started = self.last_checkpoint_at = self.clock()
        timed = (0.0, 0.0)  # clock and overhead where the budget's timing window opens
        window = {"start": started, "steps": 0, "tokens": 0}
        seen_tokens = 0
        stop = self.steps if stop_after is None else min(self.steps, stop_after)
        pending: list[torch.Tensor] = []  # losses still on the device (no sync per step on a GPU)

        def flush_losses() -> None:
            if pending:
                self.losses.extend(torch.stack(pending).float().cpu().tolist())
                pending.clear()
                if not math.isfinite(self.losses[-1]):
                    raise FloatingPointError(f"the loss is {self.losses[-1]} at step {len(self.losses)}: lower the learning rate")

        cuda = device.type == "cuda"
        for index, raw in batches(self.maker, self.start, stop, ahead=BATCHES_AHEAD if cuda else 0, pin=cuda):
            batch = to_device(raw, device)
            torch.manual_seed(tc.seed * 1_000_003 + index)  # dropout: a function of the step
            lr = self.set_lr(index)
            with autocast:
                loss, _ = net(batch)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in self.dense_params if p.grad is not None], tc.grad_clip)
            for opt in self.optimizers.values():
                opt.step()
                opt.zero_grad(set_to_none=True)
            pending.append(distributed.mean_over_ranks(loss.detach(), info))
            if device.type != "cuda":
                flush_losses()
            self.step = index + 1
            done_here = self.step - self.start
            tokens = int((raw["items"] > 0).sum()) + len(raw["items"])
            window["steps"] += 1
            window["tokens"] += tokens
            seen_tokens += tokens
            if tc.log_every and (self.step % tc.log_every == 0 or self.step == stop):
                flush_losses()
                now = time.perf_counter()
                self.emit({
                    "event": "progress", "step": self.step, "of": self.steps,
                    "epoch": round(self.step / self.maker.steps_per_epoch, 3),
                    "loss": round(float(np.mean(self.losses[-window["steps"]:])), 5), "lr": lr,
                    "samples_per_s": round(window["steps"] * self.maker.global_batch / (now - window["start"]), 1),
                    "tokens_per_s": round(window["tokens"] * info.world / (now - window["start"]), 1),
                })
                window = {"start": now, "steps": 0, "tokens": 0}
            if not self.budget_planned and done_here in (BUDGET_WARMUP_STEPS, BUDGET_WARMUP_STEPS + BUDGET_WINDOW_STEPS):
                if cuda:
                    torch.cuda.synchronize(device)
                if done_here == BUDGET_WARMUP_STEPS:
                    timed = (self.clock(), self.overhead)
                else:
                    step_seconds = (self.clock() - timed[0] - (self.overhead - timed[1])) / BUDGET_WINDOW_STEPS
                    self.plan_budget(step_seconds)
                    stop = min(stop, self.steps)
            if (self.interval and self.step % self.interval == 0) or self.step == self.steps:
                self.validate()
                if self.early.stop or self.step == self.steps:
                    self.finished = True
                    break
            if self.checkpoint_due():
                flush_losses()
                self.checkpoint()
        flush_losses()
        return time.perf_counter() - started, seen_tokens

    def finish(self) -> None:
        """The finished model holds the best validated weights; write the final checkpoint."""
        if self.finished and self.early.best_model is not None:
            self.model.load_state_dict(self.early.best_model)
            self.emit({"event": "best", "step": self.early.best_step, "score": self.early.best_score,
                       "stopped_at": self.step, "early": self.step < self.steps})


def _train(
    arrays: Arrays,
    preset: Preset,
    track: str,
    checkpoint_dir: Path | None,
    resume: bool,
    emit: Callable[[dict[str, Any]], None],
    stop_after: int | None,
    info: distributed.DistInfo,
    clock: Callable[[], float] = time.perf_counter,
) -> TrainResult:
    trainer = Trainer(arrays, preset, track, checkpoint_dir, emit, info, clock)
    if resume:
        trainer.resume()
    net: nn.Module = trainer.model
    if info.distributed:
        device = info.device
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if trainer.tc.compile and info.device.type == "cuda":
        trainer.model.compile_blocks()
    was_finished = trainer.finished
    seconds, seen_tokens = (0.0, 0) if was_finished else trainer.run(net, stop_after)
    done = trainer.step - trainer.start
    if not was_finished:
        trainer.finish()
        if done or trainer.finished or trainer.last is None or not trainer.last.is_file():
            trainer.checkpoint()
    distributed.barrier(info)
    best = next((e for e in reversed(trainer.evals) if e["step"] == trainer.weights_step), None)
    final = {k: v for k, v in (best or (trainer.evals[-1] if trainer.evals else {})).items() if k != "step"}
    return TrainResult(
        steps=trainer.step,
        resumed_from=trainer.start,
        losses=trainer.losses,
        evals=trainer.evals,
        metrics=final,
        samples_per_second=done * trainer.maker.global_batch / seconds if done and seconds > 0 else 0.0,
        tokens_per_second=seen_tokens * info.world / seconds if done and seconds > 0 else 0.0,
        seconds=seconds,
        checkpoint=trainer.last if (trainer.last is not None and info.is_main) else None,
        params=trainer.params,
        config_hash=trainer.digest,
        model_config=trainer.cfg.to_dict(),
        best_step=trainer.weights_step,
        stopped_early=trainer.finished and trainer.step < trainer.steps,
        planned_steps=trainer.steps,
        train_config=asdict(trainer.tc),
        checkpoint_version=trainer.version,
    )


# --- One track, from the project's settings (what the Dagster asset calls) ----------------------


def prepare_track_arrays(paths: TrackPaths, settings: TaacSettings, *, logger: Any = None) -> Arrays:
    """The track's arrays under ``<root>/<track>/checkpoints/arrays`` (built or reused)."""
    options = PrepareOptions(
        max_len=settings.max_history,
        # Families on auto (None): every family the warehouse selected, possibly none.
        families=None if settings.embedding_families is None else tuple(settings.embedding_families),
        val_users=settings.training.val_users,
    )
    return prepare_arrays(
        paths.warehouse, paths.checkpoints / "arrays", paths.track, options,
        codebooks_json=paths.codebooks / "codebooks.json", logger=logger or log, settings=settings,
    )


@dataclass
class TrackTraining:
    preset: Preset
    arrays: Arrays
    result: TrainResult
    report_path: Path


def train_track(
    paths: TrackPaths, settings: TaacSettings, *, logger: Any = None, on_log: Callable[[dict[str, Any]], None] | None = None
) -> TrackTraining:
    """Prepare (or reuse) the track's arrays and train (or resume) the configured preset.

    ``paths``: taac_dagster.paths.TrackPaths; ``settings``: TaacSettings (``settings.training``
    picks the preset and overrides epochs, steps, batch size, device). The checkpoint goes to
    ``<root>/<track>/checkpoints/<preset>/last.pt``, a JSON report beside it.
    """
    logger = logger or log
    ts = settings.training
    arrays = prepare_track_arrays(paths, settings, logger=logger)
    preset = load_preset(ts.preset, {"train": training_overrides(settings)})
    checkpoint_dir = paths.checkpoints / preset.name
    result = train(arrays, preset, track=paths.track, checkpoint_dir=checkpoint_dir, on_log=on_log)
    report = {
        "track": paths.track,
        "preset": preset.name,
        "config_hash": result.config_hash,
        "data_version": arrays.data_version,
        "steps": result.steps,
        "planned_steps": result.planned_steps,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "checkpoint_version": result.checkpoint_version,
        "resumed_from": result.resumed_from,
        "metrics": result.metrics,
        "evals": result.evals,
        "loss_curve": result.loss_curve(),
        "samples_per_second": result.samples_per_second,
        "tokens_per_second": result.tokens_per_second,
        "params": result.params,
        "model_config": result.model_config,
        "train_config": result.train_config,
    }
    report_path = checkpoint_dir / "report.json"
    with atomic_file(report_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str))
    return TrackTraining(preset, arrays, result, report_path)


# --- Command line (also the torchrun entry point) -----------------------------------------------


def parse_set_value(text: str) -> Any:
    """A ``--set`` value as YAML reads it, except that ``1e-3`` is a number: YAML 1.1 (PyYAML)
    reads a float only with a dot (``1.0e-3``) and would hand the optimizer a string."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_set_options(items: list[str], overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Put each ``--set model.KEY=VALUE`` / ``train.KEY=VALUE`` into ``overrides`` (its
    ``model`` and ``train`` sections) and return it; a malformed one stops the command."""
    for item in items:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in overrides or not name:
            raise SystemExit(f"--set {item!r}: expected model.KEY=VALUE or train.KEY=VALUE")
        overrides[section][name] = parse_set_value(value)
    return overrides


def progress_line(record: dict[str, Any]) -> str:
    """One training event as a line for a person (the Dagster log, in-process or through Pipes)."""
    event = record.get("event")
    if event == "progress":
        return (
            f"step {record['step']}/{record['of']} (epoch {record['epoch']}): loss {record['loss']:.4f}, "
            f"{record['samples_per_s']:.0f} sequences/s, {record['tokens_per_s']:.0f} tokens/s, lr {record['lr']:.2e}"
        )
    if event == "validation" and "hr@10" in record:
        return (
            f"validation at step {record['step']} ({record['users']} users, previous targets): HR@10 {record['hr@10']:.4f}, "
            f"NDCG@10 {record['ndcg@10']:.4f}, score {record['score']:.4f}; popularity HR@10 "
            f"{record['popularity_hr@10']:.4f}, score {record['popularity_score']:.4f}; best so far: step {record['best_step']}"
        )
    if event == "budget":
        return (
            f"time budget of {record['minutes']} minutes: {record['steps']} steps of the planned {record['planned_steps']} "
            f"fit ({record['step_seconds']:.4f} s a step, {record['validation_seconds']:.1f} s a validation); "
            f"validation every {record['validate_every']} steps"
        )
    return json.dumps(record, default=str)


@contextlib.contextmanager
def pipes_session(info: distributed.DistInfo) -> Iterator[Any]:
    """Dagster Pipes on rank 0 of a process that Dagster launched (``None`` elsewhere): the
    training events stream to the run's log while the ranks train, and the checkpoint is
    reported at the end."""
    if not info.is_main or "DAGSTER_PIPES_CONTEXT" not in os.environ:
        yield None
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        yield pipes


def _report_through_pipes(pipes: Any, result: TrainResult) -> None:
    """Report the checkpoint as the asset's materialization (rank 0, launched through Pipes)."""
    pipes.report_asset_materialization(
        metadata={
            "checkpoint": {"raw_value": str(result.checkpoint), "type": "path"},
            "steps": result.steps,
            "planned_steps": result.planned_steps,
            "samples_per_second": round(result.samples_per_second, 1),
            "final_loss": round(result.losses[-1], 5) if result.losses else None,
            **{f"val_{k}": round(float(v), 5) for k, v in result.metrics.items()},
        },
        data_version=result.checkpoint_version,
    )


@dataclass
class Command:
    """What one ``python -m models.train`` process (or torchrun rank) was asked to do."""

    preset: Preset
    track: str
    paths: TrackPaths
    # The run's settings (--settings-json, from assets.training.torchrun_command); None: the
    # environment's (TAAC_*) and the track's preset, read when the arrays are prepared.
    settings: TaacSettings | None
    arrays_dir: Path
    prepare: bool  # prepare (or reuse) the arrays first, on rank 0: no --arrays was given
    checkpoint_dir: Path
    resume: bool
    report: Path | None


def parse_command(argv: list[str] | None = None) -> Command:
    parser = argparse.ArgumentParser(description="Train the retrieval encoder on a track's warehouse.")
    parser.add_argument("--config", default="default", help="preset name (configs/models/) or YAML path")
    parser.add_argument("--data-root", default=None, help="default: the settings' data_root, else data")
    parser.add_argument("--track", default="1M")
    parser.add_argument("--arrays", default=None, help="prepared arrays folder (default: <root>/<track>/checkpoints/arrays, "
                        "prepared or reused first)")
    parser.add_argument("--settings-json", default=None, help="the run's settings (TaacSettings as JSON): the arrays are "
                        "prepared with them and their training overrides apply (under --set)")
    parser.add_argument("--checkpoint-dir", default=None, help="default: <root>/<track>/checkpoints/<preset>")
    parser.add_argument("--report", default=None, help="write losses and figures as JSON here (rank 0)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE or train.KEY=VALUE")
    args = parser.parse_args(argv)

    settings = TaacSettings.model_validate_json(args.settings_json) if args.settings_json else None
    overrides: dict[str, dict[str, Any]] = {"model": {}, "train": dict(training_overrides(settings)) if settings else {}}
    apply_set_options(args.set, overrides)
    if args.max_steps is not None:
        overrides["train"]["max_steps"] = args.max_steps
    if args.epochs is not None:
        overrides["train"]["epochs"] = args.epochs
    preset = load_preset(args.config, overrides)
    root = args.data_root or (settings.data_root if settings else "data")
    paths = TrackPaths(root, args.track)
    return Command(
        preset=preset, track=args.track, paths=paths, settings=settings,
        arrays_dir=Path(args.arrays) if args.arrays else paths.checkpoints / "arrays", prepare=not args.arrays,
        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else paths.checkpoints / preset.name,
        resume=not args.no_resume, report=Path(args.report) if args.report else None,
    )


def main(argv: list[str] | None = None) -> None:
    command = parse_command(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    info = distributed.setup(command.preset.train.device)
    try:
        if info.is_main and command.prepare:  # the asset's arrays: its settings, else TAAC_* and the track's
            from taac_dagster.settings import load_settings

            settings = command.settings or load_settings(command.track, {"data_root": str(command.paths.data_root)})
            prepare_track_arrays(command.paths, settings)
        distributed.barrier(info)
        arrays = load_arrays(command.arrays_dir)
        with pipes_session(info) as pipes:

            def on_log(record: dict[str, Any]) -> None:
                log.info(json.dumps(record))
                if pipes is not None:
                    pipes.log.info(progress_line(record))

            result = train(
                arrays, command.preset, track=command.track, checkpoint_dir=command.checkpoint_dir, resume=command.resume,
                info=info, on_log=on_log if info.is_main else (lambda r: None),
            )
            if pipes is not None:
                _report_through_pipes(pipes, result)
        if info.is_main and command.report:
            report = {
                "losses": result.losses, "evals": result.evals, "metrics": result.metrics, "steps": result.steps,
                "planned_steps": result.planned_steps, "best_step": result.best_step, "seconds": result.seconds,
                "samples_per_second": result.samples_per_second, "model_config": result.model_config,
                "world": info.world, "params": result.params, "arrays": str(arrays.folder),
                "data_version": arrays.data_version, "train_config": result.train_config,
            }
            with atomic_file(command.report) as tmp:
                tmp.write_text(json.dumps(report, indent=2, default=str))
    finally:
        distributed.cleanup(info)


if __name__ == "__main__":
    main()
