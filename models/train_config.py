"""What a training run is asked to do (``TrainConfig``, a ``Preset``) and what that decides:
the config hash, the length of the run, the learning-rate schedule, the validation interval,
the time budget's plan and the negatives its batches carry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from models.batches import BatchMaker, NegativeSpec
from models.encoder_config import EncoderConfig

# Fields that change how a run is watched, not what it computes: not part of the config hash.
_NOT_HASHED = {"log_every", "eval_batch", "checkpoint_every", "checkpoint_minutes", "device", "compile", "threads"}
# Fields hashed only when set, so that adding them left the hashes of existing runs unchanged.
_HASHED_WHEN_SET = {"max_minutes"}
# The fewest validations a run shortened by its time budget (TrainConfig.max_minutes) keeps.
BUDGET_MIN_VALIDATIONS = 10



@dataclass
class TrainConfig:
    batch_size: int = 256  # global batch (sequences per step, over all ranks)
    # Batches of similar history lengths (see BatchMaker.order): chunks of this many batches
    # are sorted by length. 0: plain shuffling (every batch padded to its longest history).
    length_buckets: int = 64
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
    lr: float = 2e-3  # AdamW's peak learning rate
    sparse_lr: float | None = None  # SparseAdam's learning rate (None: lr)
    weight_decay: float = 0.01  # AdamW, matrices only
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW's (and SparseAdam's) betas
    warmup_steps: int | None = None  # None: warmup_fraction of the planned steps
    warmup_fraction: float = 0.01  # linear warm-up over this share of the planned steps
    schedule: str = "cosine"  # constant | cosine (to 10% of lr)
    grad_clip: float = 1.0  # max norm of the dense gradients (0: off)
    # Loss weight per target action type; an action of weight 0 is never a training target.
    action_weights: dict[int, float] = field(default_factory=lambda: {0: 0.25, 1: 1.0, 2: 2.5})
    in_batch_negatives: int = 0  # target items of other positions of the global batch used as negatives
    # Sampled losses: distinct items of the batch used as negatives (all up to this many, else a
    # uniform subset of this size); 0: none.
    batch_negatives: int = 2048
    sampled_negatives: int = 512  # items drawn by the sampler (below) as negatives, shared by the batch
    # Uniform draws from the candidate pool (cold items included) added to the negatives: the
    # items retrieval ranks that training sequences may never hold. 0: none.
    pool_negatives: int = 512
    # InfoNCE: the negatives of the last this many batches (item-tower outputs, detached) join
    # the batch's own; the bank is in the checkpoint, so a resumed run sees the same one. 0: off.
    queue_batches: int = 0
    per_position_negatives: int = 0  # the official baseline's BCE: one sampled item per position
    per_position_pool: int = 4096  # ... drawn from a shared pool of this many samples (0: independent)
    sampler: str = "popularity"  # popularity | uniform
    sampler_alpha: float = 0.75  # popularity sampler: probability ~ count ** alpha
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
    # model.members auto (models/auto_settings.py choose_members): passes over the training
    # sequences budgeted per ensemble member (the sequence budget over this: the members it buys)
    member_epochs: int = 40
    max_members: int = 3  # model.members auto: at most this many (chosen on Toys validation)
    # >0: validate, keep and publish an exponential moving average of the weights with this decay
    # per step (tables over sparse_threshold rows excluded); the optimizer trains the raw weights.
    ema_decay: float = 0.0
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


@dataclass(frozen=True)
class TrackRun:
    """The track a run trains for: its name (recorded in the checkpoint) and its target actions
    by priority (what validation ranks for when the preset names no ``retrieval_actions``)."""

    name: str
    target_actions: tuple[int, ...]


def checkpoint_version(digest: str, data_version: str, step: int) -> str:
    """Names what a checkpoint holds: config, data and step (a CPU run is deterministic, so the
    same three give the same weights). Downstream indexes record it to refuse stale vectors."""
    return f"{digest}-{data_version}-s{step}"


def config_hash(model_cfg: EncoderConfig, tc: TrainConfig) -> str:
    train = {k: v for k, v in asdict(tc).items() if k not in _NOT_HASHED and not (k in _HASHED_WHEN_SET and v is None)}
    text = json.dumps({"model": model_cfg.to_dict(), "train": train}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


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
