"""One training run (``Trainer``): model, optimizers, batches, validation, early stopping,
checkpoints and the time budget. ``models.train.train`` drives it.

Optimizers: embedding tables with more rows than ``sparse_threshold`` produce sparse gradients
and are updated row-wise by ``SparseAdam`` (only the rows a batch touched); everything else uses
AdamW. The real-vocabulary shape (millions of id rows) then costs about what the small one does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models import distributed
from models.auto_settings import matmul_gflops, resolve_model_settings, resolve_train_settings
from models.batches import BatchMaker, NegativeSpec
from models.checkpoint import CHECKPOINT_FORMAT, LAST
from models.data import Arrays
from models.encoder import Encoder, ItemTables, count_parameters
from models.encoder_config import EncoderConfig
from models.losses import NegativeQueue
from models.publish import FileWriter, write_in_place
from models.runtime import BATCHES_AHEAD, batches, to_device
from models.train_config import (
    Preset,
    TrackRun,
    TrainConfig,
    budget_plan,
    checkpoint_version,
    config_hash,
    lr_at,
    negative_spec,
    total_steps,
    validation_interval,
)
from models.validation import evaluate
from models.weight_average import WeightAverage

# The time budget (TrainConfig.max_minutes): steps before the speed is measured (allocator,
# caches, compilation) and steps timed.
BUDGET_WARMUP_STEPS = 20
BUDGET_WINDOW_STEPS = 20


@dataclass
class ProgressWindow:
    """The steps since the last progress line: when they began, how many, their tokens."""

    start: float
    steps: int = 0
    tokens: int = 0


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
        self, arrays: Arrays, preset: Preset, track: TrackRun, checkpoint_dir: Path | None,
        emit: Callable[[dict[str, Any]], None], info: distributed.DistInfo,
        clock: Callable[[], float] = time.perf_counter, writer: FileWriter = write_in_place,
    ) -> None:
        tc = self.tc = resolve_train_settings(preset.train, arrays.meta, info.device)
        self.arrays, self.preset, self.track, self.emit, self.info = arrays, preset, track.name, emit, info
        self.device, self.writer = info.device, writer
        self.cfg = EncoderConfig.from_meta(arrays.meta, **resolve_model_settings(
            preset.model, tc, arrays.meta, gflops=self.softmax_speed(preset.model, tc, arrays.meta, info, writer)))
        if self.cfg.members != 1:
            raise ValueError("the trainer trains one model; models.train.train trains an ensemble member by member")
        self.digest = config_hash(self.cfg, tc)
        self.actions = tc.retrieval_actions or track.target_actions
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
        self.average = WeightAverage(model, tc.ema_decay) if tc.ema_decay > 0 else None
        dense = self.optimizers["dense"].param_groups
        self.dense_params = dense[0]["params"] + dense[1]["params"]
        self.params = count_parameters(model)
        self.val_index = np.arange(min(int(arrays.meta.get("num_val", 0)), tc.val_users))
        self.early = EarlyStopping(tc.patience if len(self.val_index) else 0)
        self.last = checkpoint_dir / LAST if checkpoint_dir is not None else None
        self.start, self.step, self.finished = 0, 0, False
        self.losses: list[float] = []
        self.pending_losses: list[torch.Tensor] = []  # losses still on the device
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
        self.budget_timed = (0.0, 0.0)  # clock and overhead where the budget's timing window opened
        self.last_checkpoint_at = clock()

    @staticmethod
    def softmax_speed(
        model: dict[str, Any], tc: TrainConfig, meta: dict[str, Any], info: distributed.DistInfo, writer: FileWriter
    ) -> float | None:
        """The device's measured GFLOP/s on the full softmax's product, when ``loss: auto`` has
        to weigh it (rank 0's figure on every rank, so that all ranks build the same model)."""
        rows = int(meta.get("num_softmax_rows", meta.get("num_item_rows", 0)))
        if model.get("loss", "auto") != "auto" or rows > tc.full_softmax_items:
            return None
        width = int(model.get("d_model", EncoderConfig.d_model))
        return distributed.broadcast_float(matmul_gflops(info.device, width, rows, writer=writer), info)

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
        if self.average is not None:
            self.average.load(ckpt.get("weight_average"))
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
            "weight_average": self.average.state() if self.average is not None else None,
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
            state = self.state()
            self.writer(self.last, lambda target: torch.save(state, target))
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
        with self.average.applied(self.model) if self.average is not None else nullcontext():
            if self.info.is_main and len(self.val_index):
                figures, spent = self.timed_validation()
                record = {"step": self.step, **{k: round(v, 5) if isinstance(v, float) else v for k, v in figures.items()}}
                self.evals.append(record)
                score = figures["score"]
                self.validation_seconds.append(spent)
            score = distributed.broadcast_float(score, self.info)
            improved = math.isfinite(score) and self.early.update(self.step, score, self.model)
        if math.isfinite(score):
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
        tc, device = self.tc, self.device
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and tc.bf16)
        self.emit_start()
        self.model.train()
        started = time.perf_counter()
        self.run_started = self.last_checkpoint_at = self.clock()
        window = ProgressWindow(started)
        seen_tokens = 0
        stop = self.steps if stop_after is None else min(self.steps, stop_after)
        cuda = device.type == "cuda"
        for index, raw in batches(self.maker, self.start, stop, ahead=BATCHES_AHEAD if cuda else 0, pin=cuda):
            lr = self.train_step(net, to_device(raw, device), index, autocast)
            self.step = index + 1
            tokens = int((raw["items"] > 0).sum()) + len(raw["items"])
            window.steps += 1
            window.tokens += tokens
            seen_tokens += tokens
            done_here = self.step - self.start
            if tc.log_every and (self.step % tc.log_every == 0 or self.step == stop):
                window = self.progress(window, lr)
            if not self.budget_planned and done_here in (BUDGET_WARMUP_STEPS, BUDGET_WARMUP_STEPS + BUDGET_WINDOW_STEPS):
                stop = self.time_steps(stop)
            if (self.interval and self.step % self.interval == 0) or self.step == self.steps:
                self.validate()
                if self.early.stop or self.step == self.steps:
                    self.finished = True
                    break
            if self.checkpoint_due():
                self.flush_losses()
                self.checkpoint()
        self.flush_losses()
        return time.perf_counter() - started, seen_tokens

    def emit_start(self) -> None:
        tc, device = self.tc, self.device
        self.emit({"event": "start", "steps": self.steps, "start": self.start, "batch": self.maker.global_batch,
                   "world": self.info.world, "device": str(device), "validate_every": self.interval,
                   "patience": self.early.patience, "threads": torch.get_num_threads() if device.type == "cpu" else None,
                   "params": self.params, "sequences": self.arrays.num_sequences, "max_minutes": tc.max_minutes})

    def train_step(self, net: nn.Module, batch: dict[str, torch.Tensor], index: int, autocast: torch.autocast) -> float:
        """One optimizer step on ``batch`` (step ``index``); returns its learning rate. The loss
        stays on a GPU until ``flush_losses`` (no synchronization per step)."""
        tc = self.tc
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
        if self.average is not None:
            self.average.update(self.model)
        self.pending_losses.append(distributed.mean_over_ranks(loss.detach(), self.info))
        if self.device.type != "cuda":
            self.flush_losses()
        return lr

    def flush_losses(self) -> None:
        """Move the losses still on the device into ``losses``; a non-finite one stops the run."""
        if self.pending_losses:
            self.losses.extend(torch.stack(self.pending_losses).float().cpu().tolist())
            self.pending_losses.clear()
            if not math.isfinite(self.losses[-1]):
                raise FloatingPointError(f"the loss is {self.losses[-1]} at step {len(self.losses)}: lower the learning rate")

    def progress(self, window: ProgressWindow, lr: float) -> ProgressWindow:
        """Emit the progress of the steps since ``window`` opened; returns the next window."""
        self.flush_losses()
        now = time.perf_counter()
        self.emit({
            "event": "progress", "step": self.step, "of": self.steps,
            "epoch": round(self.step / self.maker.steps_per_epoch, 3),
            "loss": round(float(np.mean(self.losses[-window.steps:])), 5), "lr": lr,
            "samples_per_s": round(window.steps * self.maker.global_batch / (now - window.start), 1),
            "tokens_per_s": round(window.tokens * self.info.world / (now - window.start), 1),
        })
        return ProgressWindow(now)

    def time_steps(self, stop: int) -> int:
        """At the budget's timing window: open it, or close it and plan the run for what fits;
        returns the step to stop before."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.step - self.start == BUDGET_WARMUP_STEPS:
            self.budget_timed = (self.clock(), self.overhead)
            return stop
        began, overhead = self.budget_timed
        step_seconds = (self.clock() - began - (self.overhead - overhead)) / BUDGET_WINDOW_STEPS
        self.plan_budget(step_seconds)
        return min(stop, self.steps)

    def finish(self) -> None:
        """The finished model holds the best validated weights; write the final checkpoint."""
        if self.finished and self.early.best_model is None and self.average is not None:
            self.average.copy_to(self.model)  # nothing validated: the averaged weights, not the last step's
        if self.finished and self.early.best_model is not None:
            self.model.load_state_dict(self.early.best_model)
            self.emit({"event": "best", "step": self.early.best_step, "score": self.early.best_score,
                       "stopped_at": self.step, "early": self.step < self.steps})
