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
import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models import distributed
from models.allocator import keep_freed_memory
from models.baselines import popularity_order, popularity_topk
from models.data import Arrays, BatchMaker, NegativeSpec, PrepareOptions, history_batch, load_arrays, prepare_arrays, trim_padding
from models.encoder import Encoder, EncoderConfig, ItemTables, count_parameters
from models.metrics import retrieval_metrics
from taac_dagster.atomic import atomic_file
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import TaacSettings, training_overrides
from taac_dagster.tracks import get_track

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
CHECKPOINT_FORMAT = 1
LAST = "last.pt"
# Fields that change how a run is watched, not what it computes: not part of the config hash.
_NOT_HASHED = {"log_every", "eval_batch", "checkpoint_every", "device", "compile", "threads"}


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
    budget_sequences: int = 4_000_000
    max_auto_epochs: int = 200
    max_steps: int | None = None  # overrides epochs
    # Early stopping: stop after ``patience`` validations without a better validation score
    # (0: never early); the best weights are what the run returns and saves.
    patience: int = 10
    lr: float = 1e-3
    sparse_lr: float | None = None  # SparseAdam's learning rate (None: lr)
    weight_decay: float = 0.0  # AdamW, matrices only
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int | None = None  # None: warmup_fraction of the planned steps
    warmup_fraction: float = 0.0
    schedule: str = "constant"  # constant | cosine (to 10% of lr)
    grad_clip: float = 0.0  # max norm of the dense gradients (0: off)
    # Loss weight per target action type; an action of weight 0 is never a training target.
    action_weights: dict[int, float] = field(default_factory=lambda: {0: 1.0, 1: 1.0, 2: 2.5})
    in_batch_negatives: int = 0
    # Sampled losses: distinct items of the batch used as negatives (all up to this many, else a
    # uniform subset of this size); 0: none.
    batch_negatives: int = 0
    sampled_negatives: int = 0
    per_position_negatives: int = 0  # the official baseline's BCE: one sampled item per position
    per_position_pool: int = 4096  # ... drawn from a shared pool of this many samples (0: independent)
    sampler: str = "popularity"  # popularity | uniform
    sampler_alpha: float = 1.0
    logq: bool = True
    logq_positive: bool = True
    retrieval_actions: tuple[int, ...] | None = None  # None: the track's target actions
    # A catalogue of at most this many item rows is trained with the full softmax (every item a
    # negative) when the model's loss is "auto"; a larger one with sampled negatives (InfoNCE).
    full_softmax_items: int = 100_000
    # Memory for the item id table with its Adam moments (weights + 2 moments, float32) when
    # the model's id_buckets is "auto"; a larger vocabulary is hashed into what fits.
    max_id_table_bytes: int = 6 << 30
    seed: int = 0
    val_users: int = 4096  # validation users (at most the arrays' validation split)
    # Validation ranks like the report: the user's history items excluded (the report's
    # TAAC_EVALUATION__EXCLUDE_HISTORY is passed in by train_track), so the figures compare.
    exclude_history: bool = True
    # Steps between validations. None: once per epoch, and at least every ``eval_every_max``
    # steps; 0: at the end only.
    eval_every: int | None = None
    eval_every_max: int = 2000
    eval_batch: int = 512
    log_every: int = 10
    checkpoint_every: int = 0  # 0: at the end (and when stopped) only
    device: str = "auto"
    compile: bool = False  # torch.compile on CUDA
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
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no model preset {path}; known presets: {known}")
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    overrides = overrides or {}
    model = {**(data.get("model") or {}), **(overrides.get("model") or {})}
    train = {**(data.get("train") or {}), **(overrides.get("train") or {})}
    return Preset(path.stem, model, TrainConfig.from_dict(train))


def checkpoint_version(digest: str, data_version: str, step: int) -> str:
    """Names what a checkpoint holds: config, data and step (a CPU run is deterministic, so the
    same three give the same weights). Downstream indexes record it to refuse stale vectors."""
    return f"{digest}-{data_version}-s{step}"


def config_hash(model_cfg: EncoderConfig, tc: TrainConfig) -> str:
    train = {k: v for k, v in asdict(tc).items() if k not in _NOT_HASHED}
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


def lr_at(step: int, tc: TrainConfig, steps: int) -> float:
    warmup = warmup_steps(tc, steps)
    if warmup and step < warmup:
        return tc.lr * (step + 1) / warmup
    if tc.schedule == "cosine":
        progress = (step - warmup) / max(1, steps - warmup)
        return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    return tc.lr


def resolve_model_settings(model: dict[str, Any], tc: TrainConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """The preset's model settings with the data-dependent ``auto`` values decided:

    * ``loss: auto``: the full softmax when the catalogue (the items that train or are
      candidates) has at most ``full_softmax_items`` rows, else InfoNCE over the batch's items plus sampled negatives;
    * ``dropout: auto``: 0.3 up to 1M training events, 0.1 from 100M, log-linear between;
    * ``id_init_std: auto``: zeros when items have features, multi-modal vectors or Semantic
      IDs, else a spread of 0.02;
    * ``id_buckets: auto``: one id row per item while the id table and its two Adam moments fit
      in ``max_id_table_bytes``, else hashed into as many rows as fit (the 10M track's 17.5M
      items at width 64 would take 13 GB)."""
    out = dict(model)
    rows = int(meta.get("num_softmax_rows", meta["num_item_rows"]))
    if out.get("loss", "auto") == "auto":
        out["loss"] = "softmax" if rows <= tc.full_softmax_items else "infonce"
    if out.get("dropout") == "auto":
        # Small datasets want strong regularization (Toys, 150K training events: validation
        # preferred 0.3 at temperature 0.1, of 0.1-0.5), large ones little (0.1 from 100M
        # events, the 1M track's size): log-linear in between.
        events = max(1, int(meta.get("num_events", 0)))
        out["dropout"] = round(float(np.clip(0.3 - 0.1 * math.log10(events / 1e6), 0.1, 0.3)), 3)
    if out.get("id_init_std", "auto") == "auto":
        # Ids start at zero when the item has other inputs (an id never trained then adds
        # nothing; measured better on Toys), with a small spread when the id is all there is
        # (at zero, cosine similarity gives every item the same direction to learn from).
        uses = lambda flag, key: out.get(flag, True) and bool(meta.get(key))  # noqa: E731
        content = uses("use_item_features", "item_vocab") or uses("use_mm", "mm_dims") or uses("use_sids", "sid_vocab")
        out["id_init_std"] = 0.0 if content else 0.02
    if out.get("id_buckets", "auto") == "auto":
        width = int(out.get("d_model", EncoderConfig.d_model))
        fits = tc.max_id_table_bytes // (3 * 4 * width)
        out["id_buckets"] = 0 if int(meta["id_rows"]) <= fits else int(fits)
    return out


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


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type != "cuda":
        return {k: torch.as_tensor(v) for k, v in batch.items()}
    return {k: torch.as_tensor(v).pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def batches(maker: BatchMaker, start: int, stop: int, ahead: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(step, numpy batch) for start <= step < stop. With ``ahead`` > 0 a background thread
    builds that many batches in advance (numpy indexing releases the GIL), which keeps a GPU
    fed; on CPU the batches are built inline (they cost ~1% of a step and the cores are busy)."""
    if ahead <= 0:
        for step in range(start, stop):
            yield step, maker.batch(step)
        return
    queue: Queue = Queue(maxsize=ahead)
    done = threading.Event()

    def produce() -> None:
        try:
            for step in range(start, stop):
                if done.is_set():
                    return
                queue.put((step, maker.batch(step)))
        except BaseException as exc:  # surfaced in the consumer
            queue.put((None, exc))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        for _ in range(start, stop):
            step, item = queue.get()
            if step is None:
                raise item
            yield step, item
    finally:
        done.set()
        while thread.is_alive():
            try:
                queue.get_nowait()
            except Empty:
                thread.join(timeout=0.01)


def negative_spec(tc: TrainConfig) -> NegativeSpec:
    return NegativeSpec(
        in_batch=tc.in_batch_negatives,
        batch_items=tc.batch_negatives,
        sampled=tc.sampled_negatives,
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
    targets, ``hold``: test targets) against the whole candidate pool, with the report's
    history filter, next to the report's popularity ranking under the same filter."""
    was_training = model.training
    model.eval()
    # Users in order of history length, so that each trimmed chunk holds histories of one size.
    index = np.asarray(index)[np.argsort((history_batch(arrays, split, index)["items"] > 0).sum(1), kind="stable")]
    cand_rows = np.asarray(arrays.cand_rows).astype(np.int64)
    position = np.full(arrays.meta["num_item_rows"], -1, np.int64)
    position[cand_rows] = np.arange(len(cand_rows))
    targets = position[np.asarray(arrays.a[f"{split}_target"][index]).astype(np.int64)]
    keys = torch.cat([
        model.item_vectors(torch.from_numpy(cand_rows[i : i + 65_536]).to(device))
        for i in range(0, len(cand_rows), 65_536)
    ])
    chunk = max(1, min(batch_size, (1 << 26) // max(1, len(cand_rows))))
    topk, histories = [], []
    for i in range(0, len(index), chunk):
        batch = trim_padding(history_batch(arrays, split, index[i : i + chunk]))
        scores = model.user_vectors(to_device(batch, device), actions) @ keys.T
        history = position[batch["items"]]
        histories.append(np.pad(history, ((0, 0), (arrays.meta["max_len"] - history.shape[1], 0)), constant_values=-1))
        if exclude_history:
            rows, cols = np.nonzero(history >= 0)
            scores[torch.from_numpy(rows).to(device), torch.from_numpy(history[rows, cols]).to(device)] = -torch.inf
        topk.append(scores.topk(min(k, scores.shape[1]), dim=1).indices.cpu().numpy())
    model.train(was_training)
    result = retrieval_metrics(np.concatenate(topk), targets, k)
    popular = popularity_order(arrays, actions)
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
    of ``arrays`` (default: the arrays the checkpoint was trained on) when they can be found."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain containers and tensors only
    model = Encoder(EncoderConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
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
    planned_steps: int = 0

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
) -> TrainResult:
    """Train (or resume) one model on prepared arrays; returns curves, figures and the
    checkpoint path. ``stop_after`` stops at that step as if interrupted (checkpoint written)."""
    tc = preset.train
    info = info or distributed.DistInfo(device=distributed.pick_device(tc.device))
    emit = on_log or (lambda record: log.info(json.dumps(record)))
    threads_before = torch.get_num_threads()
    if info.device.type == "cpu":
        torch.set_num_threads(cpu_threads(tc.threads))
        keep_freed_memory()  # the step's activations come back from the heap (models/allocator.py)
    try:
        return _train(arrays, preset, track, checkpoint_dir, resume, emit, stop_after, info)
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
    """One training run: model, optimizers, batches, validation, early stopping, checkpoints."""

    def __init__(
        self, arrays: Arrays, preset: Preset, track: str, checkpoint_dir: Path | None,
        emit: Callable[[dict[str, Any]], None], info: distributed.DistInfo,
    ) -> None:
        tc = self.tc = preset.train
        self.arrays, self.preset, self.track, self.emit, self.info = arrays, preset, track, emit, info
        self.device = info.device
        self.cfg = EncoderConfig.from_meta(arrays.meta, **resolve_model_settings(preset.model, tc, arrays.meta))
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

    # -- checkpoints -------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the last checkpoint of the same config, data and planned length."""
        if self.last is None or not self.last.is_file():
            return
        ckpt = torch.load(self.last, map_location="cpu", weights_only=True)
        same = ckpt.get("config_hash") == self.digest and ckpt.get("data_version") == self.arrays.data_version
        same = same and ckpt["step"] <= self.steps and ckpt.get("total_steps") == self.steps
        if not same:
            self.emit({"event": "fresh_start", "reason": "the last checkpoint has another config, data or length"})
            return
        self.model.load_state_dict(ckpt["model"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optim"][name])
        self.start = self.step = ckpt["step"]
        self.losses, self.evals = list(ckpt["losses"]), list(ckpt["evals"])
        self.early.load(ckpt.get("early_stopping"))
        self.finished = bool(ckpt.get("finished"))
        self.emit({"event": "resume", "step": self.start, "finished": self.finished, "checkpoint": str(self.last)})

    @property
    def weights_step(self) -> int:
        """The step whose weights the model holds once finished: the best validation's."""
        return self.early.best_step if (self.finished and self.early.best_step > 0) else self.step

    def state(self) -> dict[str, Any]:
        arrays = self.arrays
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "weights_step": self.weights_step,
            "finished": self.finished,
            "total_steps": self.steps,
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
            # A finished checkpoint holds the best weights as "model": no second copy.
            "early_stopping": {**self.early.state(), **({"best_model": None} if self.finished else {})},
            "losses": self.losses,
            "evals": self.evals,
            "retrieval_actions": list(self.actions),
            "params": self.params,
            "checkpoint_version": checkpoint_version(self.digest, arrays.data_version, self.weights_step),
        }

    def checkpoint(self) -> None:
        if self.info.is_main and self.last is not None:
            save_checkpoint(self.last, self.state())

    # -- steps -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Score the validation split (rank 0) and update early stopping on every rank."""
        score = -math.inf
        if self.info.is_main and len(self.val_index):
            figures = evaluate(self.model, self.arrays, self.val_index, self.actions, device=self.device,
                               exclude_history=self.tc.exclude_history, batch_size=self.tc.eval_batch)
            record = {"step": self.step, **{k: round(v, 5) if isinstance(v, float) else v for k, v in figures.items()}}
            self.evals.append(record)
            score = figures["score"]
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
        returns (seconds, tokens seen)."""
        tc, device, info = self.tc, self.device, self.info
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and tc.bf16)
        self.emit({"event": "start", "steps": self.steps, "start": self.start, "batch": self.maker.global_batch,
                   "world": info.world, "device": str(device), "validate_every": self.interval,
                   "patience": self.early.patience, "threads": torch.get_num_threads() if device.type == "cpu" else None,
                   "params": self.params, "sequences": self.arrays.num_sequences})
        self.model.train()
        started = time.perf_counter()
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

        for index, raw in batches(self.maker, self.start, stop, ahead=2 if device.type == "cuda" else 0):
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
            if (self.interval and self.step % self.interval == 0) or self.step == self.steps:
                self.validate()
                if self.early.stop or self.step == self.steps:
                    self.finished = True
                    break
            if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
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
) -> TrainResult:
    trainer = Trainer(arrays, preset, track, checkpoint_dir, emit, info)
    if resume:
        trainer.resume()
    net: nn.Module = trainer.model
    if info.distributed:
        device = info.device
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if trainer.tc.compile and info.device.type == "cuda":
        net = torch.compile(net)
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
        "checkpoint_version": checkpoint_version(result.config_hash, arrays.data_version, result.best_step),
        "resumed_from": result.resumed_from,
        "metrics": result.metrics,
        "evals": result.evals,
        "loss_curve": result.loss_curve(),
        "samples_per_second": result.samples_per_second,
        "tokens_per_second": result.tokens_per_second,
        "params": result.params,
        "model_config": result.model_config,
        "train_config": asdict(preset.train),
    }
    report_path = checkpoint_dir / "report.json"
    with atomic_file(report_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str))
    return TrackTraining(preset, arrays, result, report_path)


# --- Command line (also the torchrun entry point) -----------------------------------------------


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _report_through_pipes(result: TrainResult, data_version: str) -> None:
    """When Dagster launched this process through Pipes, report the checkpoint (rank 0 only)."""
    if "DAGSTER_PIPES_CONTEXT" not in os.environ:
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        pipes.report_asset_materialization(
            metadata={
                "checkpoint": {"raw_value": str(result.checkpoint), "type": "path"},
                "steps": result.steps,
                "samples_per_second": round(result.samples_per_second, 1),
                "final_loss": round(result.losses[-1], 5) if result.losses else None,
                **{f"val_{k}": round(float(v), 5) for k, v in result.metrics.items()},
            },
            data_version=checkpoint_version(result.config_hash, data_version, result.best_step),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the retrieval encoder on a track's warehouse.")
    parser.add_argument("--config", default="default", help="preset name (configs/models/) or YAML path")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--track", default="1M")
    parser.add_argument("--arrays", default=None, help="prepared arrays folder (default: <root>/<track>/checkpoints/arrays)")
    parser.add_argument("--checkpoint-dir", default=None, help="default: <root>/<track>/checkpoints/<preset>")
    parser.add_argument("--report", default=None, help="write losses and figures as JSON here (rank 0)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE or train.KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    overrides: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section not in overrides or not name:
            raise SystemExit(f"--set {item!r}: expected model.KEY=VALUE or train.KEY=VALUE")
        overrides[section][name] = _parse_value(value)
    if args.max_steps is not None:
        overrides["train"]["max_steps"] = args.max_steps
    if args.epochs is not None:
        overrides["train"]["epochs"] = args.epochs
    preset = load_preset(args.config, overrides)
    info = distributed.setup(preset.train.device)
    try:
        from taac_dagster.paths import TrackPaths
        from taac_dagster.settings import load_settings

        paths = TrackPaths(args.data_root, args.track)
        arrays_dir = Path(args.arrays) if args.arrays else paths.checkpoints / "arrays"
        if info.is_main and not args.arrays:  # same arrays as the asset (same settings: TAAC_*)
            prepare_track_arrays(paths, load_settings(args.track, {"data_root": args.data_root}))
        distributed.barrier(info)
        arrays = load_arrays(arrays_dir)
        ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else paths.checkpoints / preset.name
        result = train(
            arrays, preset, track=args.track, checkpoint_dir=ckpt_dir, resume=not args.no_resume,
            info=info, on_log=(lambda r: log.info(json.dumps(r))) if info.is_main else (lambda r: None),
        )
        if info.is_main and args.report:
            report = {
                "losses": result.losses, "evals": result.evals, "metrics": result.metrics, "steps": result.steps,
                "samples_per_second": result.samples_per_second, "world": info.world, "params": result.params,
            }
            with atomic_file(args.report) as tmp:
                tmp.write_text(json.dumps(report, indent=2))
        if info.is_main:
            _report_through_pipes(result, arrays.data_version)
    finally:
        distributed.cleanup(info)


if __name__ == "__main__":
    main()
