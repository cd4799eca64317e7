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
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models import distributed
from models.allocator import keep_freed_memory
from models.auto_settings import choose_members, resolve_train_settings
from models.checkpoint import LAST
from models.data import Arrays
from models.ensemble_training import train_members
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
    finished: bool = False  # ended by its length or early stopping (not stopped or interrupted)

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
        members = ensemble_members(preset, arrays, info, emit)
        if members == 1:
            single = Preset(preset.name, {**preset.model, "members": 1}, tc)
            return _train(arrays, single, track, checkpoint_dir, resume, emit, stop_after, info, clock, writer)

        def run_member(member: Preset, folder: Path | None) -> TrainResult:
            return _train(arrays, member, track, folder, resume, emit, stop_after, info, clock, writer)

        with tempfile.TemporaryDirectory(prefix="taac_members_") if checkpoint_dir is None else nullcontext() as spare:
            folder = checkpoint_dir if checkpoint_dir is not None else Path(str(spare))
            results, state = train_members(arrays, preset, members, track=track, checkpoint_dir=folder,
                                           run_member=run_member, emit=emit, info=info, writer=writer)
            if state is None:
                return results[-1]
            return ensemble_result(results, state, folder / LAST if checkpoint_dir is not None else None)
    finally:
        torch.set_num_threads(threads_before)


def ensemble_members(preset: Preset, arrays: Arrays, info: distributed.DistInfo,
                     emit: Callable[[dict[str, Any]], None]) -> int:
    """How many models the run trains: the preset's ``members``, or ``choose_members`` when it
    leaves it out or says ``auto`` (decided with the device's training settings)."""
    asked = preset.model.get("members", "auto")
    if asked != "auto":
        return int(asked)
    tc = resolve_train_settings(preset.train, arrays.meta, info.device)
    members, why = choose_members(preset.model, tc, arrays.meta)
    emit({"event": "members", "members": members, "why": why})
    return members


def ensemble_result(results: list[TrainResult], state: dict[str, Any], checkpoint: Path | None) -> TrainResult:
    """The run's result once its members are joined (``state``: the joined checkpoint)."""
    seconds = sum(r.seconds for r in results)
    figures = state["evals"][-1] if state["evals"] else {}
    return TrainResult(
        steps=int(state["step"]),
        resumed_from=sum(r.resumed_from for r in results),
        losses=list(state["losses"]),
        evals=list(state["evals"]),
        metrics={k: v for k, v in figures.items() if k != "step"},
        samples_per_second=sum(r.samples_per_second * r.seconds for r in results) / seconds if seconds > 0 else 0.0,
        tokens_per_second=sum(r.tokens_per_second * r.seconds for r in results) / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        checkpoint=checkpoint,
        params=dict(state["params"]),
        config_hash=str(state["config_hash"]),
        model_config=dict(state["model_config"]),
        best_step=int(state["weights_step"]),
        stopped_early=all(r.stopped_early for r in results),
        planned_steps=int(state["planned_steps"]),
        train_config=dict(state["train_config"]),
        checkpoint_version=str(state["checkpoint_version"]),
        finished=True,
    )


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
        finished=trainer.finished,
    )
