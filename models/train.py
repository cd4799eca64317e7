"""Training of the retrieval encoder on prepared arrays: ``train`` runs (or resumes) one preset.

A run is a pure function of (arrays, preset, seed) on CPU: batches are addressed by step
(models/batches.py), dropout is re-seeded every step, and the learning rate is computed from the
step, so a run interrupted at step s and resumed from its checkpoint ends with the same weights
as an uninterrupted one.

Under torchrun each rank builds the same global batch and keeps its slice; the loss is scaled
so that DDP's gradient average equals the gradient of the single-process loss on the global
batch (same trajectory, to float tolerance). Only rank 0 evaluates and writes. The command line
and the per-track glue are taac_dagster/steps/train_cli.py and taac_dagster/steps/training.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models import distributed
from models.allocator import keep_freed_memory
from models.data import Arrays
from models.publish import FileWriter, write_in_place
from models.runtime import cpu_threads
from models.train_config import Preset, TrackRun
from models.trainer import Trainer

log = logging.getLogger(__name__)


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
    track: TrackRun,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
    info: distributed.DistInfo | None = None,
    clock: Callable[[], float] = time.perf_counter,
    writer: FileWriter = write_in_place,
) -> TrainResult:
    """Train (or resume) one model on prepared arrays; returns curves, figures and the
    checkpoint path. ``track``: the track's name and target actions (validation ranks for them
    unless the preset names ``retrieval_actions``). ``stop_after`` stops at that
    step as if interrupted (checkpoint written). ``clock`` (seconds) times the run for the time
    budget and the periodic checkpoints. ``writer`` writes the checkpoints and the device speed
    cache (the steps layer's publishes them atomically)."""
    tc = preset.train
    info = info or distributed.DistInfo(device=distributed.pick_device(tc.device))
    emit = on_log or (lambda record: log.info(json.dumps(record)))
    threads_before = torch.get_num_threads()
    if info.device.type == "cpu":
        torch.set_num_threads(cpu_threads(tc.threads))
        keep_freed_memory()  # the step's activations come back from the heap (models/allocator.py)
    try:
        return _train(arrays, preset, track, checkpoint_dir, resume, emit, stop_after, info, clock, writer)
    finally:
        torch.set_num_threads(threads_before)


def _train(
    arrays: Arrays,
    preset: Preset,
    track: TrackRun,
    checkpoint_dir: Path | None,
    resume: bool,
    emit: Callable[[dict[str, Any]], None],
    stop_after: int | None,
    info: distributed.DistInfo,
    clock: Callable[[], float] = time.perf_counter,
    writer: FileWriter = write_in_place,
) -> TrainResult:
    trainer = Trainer(arrays, preset, track, checkpoint_dir, emit, info, clock, writer)
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
