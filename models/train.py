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
from models.data import Arrays, BatchMaker, NegativeSpec, PrepareOptions, holdout_batch, load_arrays, prepare_arrays
from models.encoder import Encoder, EncoderConfig, ItemTables, count_parameters
from models.metrics import retrieval_metrics
from taac_dagster.atomic import atomic_file
from taac_dagster.tracks import get_track

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
CHECKPOINT_FORMAT = 1
LAST = "last.pt"
# Fields that change how a run is watched, not what it computes: not part of the config hash.
_NOT_HASHED = {"epochs", "max_steps", "log_every", "eval_every", "eval_batch", "checkpoint_every", "device", "compile", "threads"}


@dataclass
class TrainConfig:
    batch_size: int = 256  # global batch (sequences per step, over all ranks)
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    lr: float = 1e-3
    sparse_lr: float | None = None  # SparseAdam's learning rate (None: lr)
    weight_decay: float = 0.0  # AdamW, matrices only
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (to 10% of lr)
    grad_clip: float = 0.0  # max norm of the dense gradients (0: off)
    # Loss weight per target action type; an action of weight 0 is never a training target.
    action_weights: dict[int, float] = field(default_factory=lambda: {0: 1.0, 1: 1.0, 2: 2.5})
    in_batch_negatives: int = 0
    sampled_negatives: int = 0
    per_position_negatives: int = 0  # the official baseline's BCE: one sampled item per position
    per_position_pool: int = 4096  # ... drawn from a shared pool of this many samples (0: independent)
    sampler: str = "popularity"  # popularity | uniform
    sampler_alpha: float = 1.0
    logq: bool = True
    retrieval_actions: tuple[int, ...] | None = None  # None: the track's target actions
    seed: int = 0
    val_users: int = 1000  # validation users (a fixed subset of the holdout)
    eval_every: int = 0  # 0: at the end only
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


def total_steps(tc: TrainConfig, maker: BatchMaker) -> int:
    return int(tc.max_steps) if tc.max_steps is not None else int(tc.epochs * maker.steps_per_epoch)


def lr_at(step: int, tc: TrainConfig, steps: int) -> float:
    if tc.warmup_steps and step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.schedule == "cosine":
        progress = (step - tc.warmup_steps) / max(1, steps - tc.warmup_steps)
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
        sampled=tc.sampled_negatives,
        per_position=tc.per_position_negatives,
        per_position_pool=tc.per_position_pool,
        sampler=tc.sampler,
        alpha=tc.sampler_alpha,
        logq=tc.logq,
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
    k: int = 10,
    batch_size: int = 512,
) -> dict[str, float]:
    """HR@k / NDCG@k / score of the model on holdout rows ``index`` against the candidate pool,
    next to the popularity baseline (the k candidates most often a target in training)."""
    was_training = model.training
    model.eval()
    cand_rows = np.asarray(arrays.cand_rows).astype(np.int64)
    position = np.full(arrays.meta["num_item_rows"], -1, np.int64)
    position[cand_rows] = np.arange(len(cand_rows))
    targets = position[np.asarray(arrays.hold_target[index]).astype(np.int64)]
    keys = torch.cat([
        model.item_vectors(torch.from_numpy(cand_rows[i : i + 65_536]).to(device))
        for i in range(0, len(cand_rows), 65_536)
    ])
    chunk = max(1, min(batch_size, (1 << 26) // max(1, len(cand_rows))))
    topk = []
    for i in range(0, len(index), chunk):
        batch = to_device(holdout_batch(arrays, index[i : i + chunk]), device)
        scores = model.user_vectors(batch, actions) @ keys.T
        topk.append(scores.topk(min(k, scores.shape[1]), dim=1).indices.cpu().numpy())
    model.train(was_training)
    result = retrieval_metrics(np.concatenate(topk), targets, k)
    counts = np.asarray(arrays.item_counts)[:, list(actions)].sum(axis=1)[cand_rows]
    popular = np.argsort(-counts, kind="stable")[:k]
    baseline = retrieval_metrics(np.broadcast_to(popular, (len(targets), len(popular))), targets, k)
    result.update({f"popularity_{key}": value for key, value in baseline.items()})
    result["users"] = int(len(index))
    return result


# --- Checkpoints ------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
    return path


def load_encoder(path: str | Path, arrays: Arrays | None = None, device: str | torch.device = "cpu") -> tuple[Encoder, dict[str, Any]]:
    """Rebuild the model from a checkpoint alone (its config is inside); attach the item tables
    of ``arrays`` (default: the arrays the checkpoint was trained on) when they can be found."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
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
    try:
        return _train(arrays, preset, track, checkpoint_dir, resume, emit, stop_after, info)
    finally:
        torch.set_num_threads(threads_before)


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
    tc, device = preset.train, info.device
    cfg = EncoderConfig.from_meta(arrays.meta, **preset.model)
    digest = config_hash(cfg, tc)
    actions = tc.retrieval_actions or default_retrieval_actions(track)
    maker = BatchMaker(
        arrays, tc.batch_size, seed=tc.seed, action_weights=tc.action_weights,
        negatives=negative_spec(tc), rank=info.rank, world=info.world,
    )
    steps = total_steps(tc, maker)
    torch.manual_seed(tc.seed)
    model = Encoder(cfg).to(device)
    model.attach(ItemTables.from_arrays(arrays).to(device))
    if info.distributed and device.type == "cuda":
        # NCCL has no sparse all-reduce for DDP: the big tables take dense gradients there.
        for module in model.modules():
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                module.sparse = False
    optimizers = make_optimizers(model, tc)
    params = count_parameters(model)

    # Resume from the last checkpoint of the same config and data.
    start, losses, evals = 0, [], []
    last = checkpoint_dir / LAST if checkpoint_dir is not None else None
    if resume and last is not None and last.is_file():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        same = ckpt.get("config_hash") == digest and ckpt.get("data_version") == arrays.data_version
        same = same and ckpt["step"] <= steps and (tc.schedule == "constant" or ckpt.get("total_steps") == steps)
        if same:
            model.load_state_dict(ckpt["model"])
            for name, opt in optimizers.items():
                opt.load_state_dict(ckpt["optim"][name])
            start, losses, evals = ckpt["step"], list(ckpt["losses"]), list(ckpt["evals"])
            emit({"event": "resume", "step": start, "checkpoint": str(last)})
        else:
            emit({"event": "fresh_start", "reason": "the last checkpoint has another config, data or length"})

    net: nn.Module = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if tc.compile and device.type == "cuda":
        net = torch.compile(net)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and tc.bf16)
    val_index = np.asarray(arrays.val_index)[: tc.val_users]
    dense_params = optimizers["dense"].param_groups[0]["params"] + optimizers["dense"].param_groups[1]["params"]

    def state(step: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "total_steps": steps,
            "track": track,
            "preset": preset.name,
            "model_config": cfg.to_dict(),
            "train_config": asdict(tc),
            "config_hash": digest,
            "data_version": arrays.data_version,
            "arrays_dir": str(arrays.folder),
            # What the item and user tables meant at training time: checked before scoring.
            "data_shape": {key: arrays.meta[key] for key in ("families", "item_features", "user_sparse", "user_multi")},
            "model": model.state_dict(),
            "optim": {name: opt.state_dict() for name, opt in optimizers.items()},
            "losses": losses,
            "evals": evals,
            "retrieval_actions": list(actions),
            "params": params,
            "checkpoint_version": checkpoint_version(digest, arrays.data_version, step),
        }

    def checkpoint(step: int) -> None:
        if info.is_main and last is not None:
            save_checkpoint(last, state(step))

    def validate(step: int) -> None:
        if info.is_main and len(val_index):
            figures = evaluate(model, arrays, val_index, actions, device=device, batch_size=tc.eval_batch)
            evals.append({"step": step, **{k: round(v, 5) if isinstance(v, float) else v for k, v in figures.items()}})
            emit({"event": "validation", **evals[-1]})

    evals_before = len(evals)
    emit({"event": "start", "steps": steps, "start": start, "batch": maker.global_batch, "world": info.world,
          "device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
          "params": params, "sequences": arrays.num_sequences})
    model.train()
    started = time.perf_counter()
    window_start, window_steps, window_tokens = started, 0, 0
    seen_tokens = 0
    stop = steps if stop_after is None else min(steps, stop_after)
    step = start
    pending: list[torch.Tensor] = []  # losses still on the device (no sync per step on a GPU)

    def flush_losses() -> None:
        if pending:
            losses.extend(torch.stack(pending).float().cpu().tolist())
            pending.clear()
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"the loss is {losses[-1]} at step {len(losses)}: lower the learning rate")

    for index, raw in batches(maker, start, stop, ahead=2 if device.type == "cuda" else 0):
        batch = to_device(raw, device)
        torch.manual_seed(tc.seed * 1_000_003 + index)  # dropout: a function of the step
        lr = lr_at(index, tc, steps)
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr if opt is optimizers["dense"] else (tc.sparse_lr or tc.lr) * lr / tc.lr
        with autocast:
            loss, _ = net(batch)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in dense_params if p.grad is not None], tc.grad_clip)
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        pending.append(distributed.mean_over_ranks(loss.detach(), info))
        if device.type != "cuda":
            flush_losses()
        step = index + 1
        tokens = int((raw["items"] > 0).sum()) + len(raw["items"])
        window_steps += 1
        window_tokens += tokens
        seen_tokens += tokens
        if tc.log_every and (step % tc.log_every == 0 or step == stop):
            flush_losses()
            now = time.perf_counter()
            emit({
                "event": "progress", "step": step, "of": steps, "epoch": round(step / maker.steps_per_epoch, 3),
                "loss": round(float(np.mean(losses[-window_steps:])), 5), "lr": lr,
                "samples_per_s": round(window_steps * maker.global_batch / (now - window_start), 1),
                "tokens_per_s": round(window_tokens * info.world / (now - window_start), 1),
            })
            window_start, window_steps, window_tokens = now, 0, 0
        if tc.eval_every and step % tc.eval_every == 0 and step < steps:
            validate(step)
        if tc.checkpoint_every and step % tc.checkpoint_every == 0:
            flush_losses()
            checkpoint(step)
    flush_losses()
    seconds = time.perf_counter() - started
    done = step - start
    if step == steps and (not evals or evals[-1]["step"] != step):
        validate(step)
    if done or not (last is not None and last.is_file()) or len(evals) != evals_before:
        checkpoint(step)
    distributed.barrier(info)
    final = {k: v for k, v in (evals[-1] if evals else {}).items() if k != "step"}
    return TrainResult(
        steps=step,
        resumed_from=start,
        losses=losses,
        evals=evals,
        metrics=final,
        samples_per_second=done * maker.global_batch / seconds if done and seconds > 0 else 0.0,
        tokens_per_second=seen_tokens * info.world / seconds if done and seconds > 0 else 0.0,
        seconds=seconds,
        checkpoint=last if (last is not None and info.is_main) else None,
        params=params,
        config_hash=digest,
        model_config=cfg.to_dict(),
    )


# --- One track, from the project's settings (what the Dagster asset calls) ----------------------


def prepare_track_arrays(paths: Any, settings: Any, *, logger: Any = None) -> Arrays:
    """The track's arrays under ``<root>/<track>/checkpoints/arrays`` (built or reused)."""
    options = PrepareOptions(
        max_len=settings.max_history,
        # Families on auto (None): every family the warehouse selected, possibly none.
        families=None if settings.embedding_families is None else tuple(settings.embedding_families),
        val_users=max(1000, settings.training.val_users),
    )
    return prepare_arrays(
        paths.warehouse, paths.checkpoints / "arrays", paths.track, options,
        codebooks_json=paths.codebooks / "codebooks.json", logger=logger or log,
    )


@dataclass
class TrackTraining:
    preset: Preset
    arrays: Arrays
    result: TrainResult
    report_path: Path


def train_track(paths: Any, settings: Any, *, logger: Any = None, on_log: Callable[[dict[str, Any]], None] | None = None) -> TrackTraining:
    """Prepare (or reuse) the track's arrays and train (or resume) the configured preset.

    ``paths``: taac_dagster.paths.TrackPaths; ``settings``: TaacSettings (``settings.training``
    picks the preset and overrides epochs, steps, batch size, device). The checkpoint goes to
    ``<root>/<track>/checkpoints/<preset>/last.pt``, a JSON report beside it.
    """
    logger = logger or log
    ts = settings.training
    arrays = prepare_track_arrays(paths, settings, logger=logger)
    train_overrides: dict[str, Any] = {"device": ts.device, "val_users": ts.val_users}
    for key in ("epochs", "max_steps", "batch_size", "threads"):
        if getattr(ts, key) is not None:
            train_overrides[key] = getattr(ts, key)
    preset = load_preset(ts.preset, {"train": train_overrides})
    checkpoint_dir = paths.checkpoints / preset.name
    result = train(arrays, preset, track=paths.track, checkpoint_dir=checkpoint_dir, on_log=on_log)
    report = {
        "track": paths.track,
        "preset": preset.name,
        "config_hash": result.config_hash,
        "data_version": arrays.data_version,
        "steps": result.steps,
        "checkpoint_version": checkpoint_version(result.config_hash, arrays.data_version, result.steps),
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
            data_version=checkpoint_version(result.config_hash, data_version, result.steps),
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
