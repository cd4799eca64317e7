"""Training an ensemble (``members`` > 1): each member is an ordinary run of its own seed, one
after another, then the members are joined into one checkpoint.

Member ``i`` is the preset with ``seed + i`` (its own initial weights, batch order, dropout and
negatives) and ``members: 1``, trained, validated and early-stopped exactly as a single model
is, in ``<checkpoint_dir>/members/<i>/``, where an interrupted member resumes. Once every member
has finished, their kept weights are joined (models/encoder_ensemble.py), the ensemble is
validated on the same users, and ``<checkpoint_dir>/last.pt`` is written: the file every reader
of a checkpoint reads. A time budget (``max_minutes``) is shared equally by the members.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import distributed
from models.auto_settings import resolve_train_settings
from models.checkpoint import CHECKPOINT_FORMAT, LAST, load_encoder
from models.data import Arrays
from models.encoder import ItemTables, count_parameters
from models.encoder_ensemble import EncoderEnsemble
from models.publish import FileWriter
from models.train_config import Preset, TrackRun, checkpoint_version, config_hash
from models.validation import evaluate

MEMBERS_DIR = "members"


def member_preset(preset: Preset, index: int, members: int) -> Preset:
    """Member ``index``'s preset: one model, seed + index, its share of a time budget."""
    tc = preset.train
    minutes = tc.max_minutes / members if tc.max_minutes is not None else None
    return Preset(preset.name, {**preset.model, "members": 1},
                  dataclasses.replace(tc, seed=tc.seed + index, max_minutes=minutes))


def reusable_join(path: Path | None, results: list[Any], data_version: str) -> dict[str, Any] | None:
    """The joined checkpoint at ``path`` when it joins exactly these members' weights, else None."""
    if path is None or not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    versions = [member.get("checkpoint_version") for member in ckpt.get("members") or []]
    same = ckpt.get("data_version") == data_version and versions == [r.checkpoint_version for r in results]
    return ckpt if same else None


def train_members(
    arrays: Arrays,
    preset: Preset,
    members: int,
    *,
    track: TrackRun,
    checkpoint_dir: Path | None,
    run_member: Callable[[Preset, Path | None], Any],
    emit: Callable[[dict[str, Any]], None],
    info: distributed.DistInfo,
    writer: FileWriter,
) -> tuple[list[Any], dict[str, Any] | None]:
    """Train (or resume) the members, then join them: (the members' results, the joined
    checkpoint's state, None when a member stopped unfinished or this rank does not write).
    ``run_member(preset, folder)`` trains one model and returns its ``TrainResult``."""
    results = []
    for index in range(members):
        emit({"event": "member", "member": index, "members": members, "seed": preset.train.seed + index})
        folder = checkpoint_dir / MEMBERS_DIR / str(index) if checkpoint_dir is not None else None
        result = run_member(member_preset(preset, index, members), folder)
        results.append(result)
        if not result.finished:
            return results, None
    distributed.barrier(info)
    if not info.is_main:
        return results, None
    target = checkpoint_dir / LAST if checkpoint_dir is not None else None
    kept = reusable_join(target, results, arrays.data_version)
    if kept is not None:
        return results, kept
    state = joined_state(arrays, preset, results, track=track, device=info.device)
    if target is not None:
        writer(target, lambda path: torch.save(state, path))
    figures = state["evals"][-1] if state["evals"] else {}  # none without validation users
    emit({"event": "ensemble", "members": members, **{k: v for k, v in figures.items() if k != "step"}})
    return results, state


def joined_state(
    arrays: Arrays, preset: Preset, results: list[Any], *, track: TrackRun, device: torch.device,
) -> dict[str, Any]:
    """The joined checkpoint: the members' kept weights as one ensemble, validated on the
    members' validation users, with each member's record."""
    loaded = [load_encoder(result.checkpoint, arrays, device) for result in results]
    model = EncoderEnsemble.of([encoder for encoder, _ in loaded]).eval()
    tables = loaded[0][0].tables  # every member was given the same arrays' item tables
    model.attach(tables if tables is not None else ItemTables.from_arrays(arrays).to(device))
    first = loaded[0][1]
    tc = resolve_train_settings(preset.train, arrays.meta, device)  # what the members trained with
    digest = config_hash(model.cfg, tc)
    steps = sum(int(result.steps) for result in results)
    actions = tuple(first["retrieval_actions"])
    val_index = np.arange(min(int(arrays.meta.get("num_val", 0)), tc.val_users))
    evals = []
    if len(val_index):
        figures = evaluate(model, arrays, val_index, actions, device=device, exclude_history=tc.exclude_history,
                           batch_size=tc.eval_batch)
        evals.append({"step": steps, **{k: round(v, 5) if isinstance(v, float) else v for k, v in figures.items()}})
    kept = "+".join(str(int(result.best_step)) for result in results)
    return {
        "format": CHECKPOINT_FORMAT,
        "step": steps, "weights_step": steps, "finished": True,
        "total_steps": steps, "planned_steps": sum(int(result.planned_steps) for result in results),
        "track": track.name, "preset": preset.name,
        "model_config": model.cfg.to_dict(), "train_config": dataclasses.asdict(tc), "config_hash": digest,
        "data_version": arrays.data_version, "arrays_dir": str(arrays.folder), "data_shape": first["data_shape"],
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optim": {}, "negative_queue": None, "early_stopping": None, "weight_average": None,
        "losses": [loss for result in results for loss in result.losses],
        "evals": evals,
        "retrieval_actions": list(actions),
        "params": count_parameters(model),
        "elapsed_seconds": sum(float(result.seconds) for result in results),
        "members": [
            {"seed": tc.seed + i, "steps": r.steps, "best_step": r.best_step, "checkpoint": str(r.checkpoint),
             "checkpoint_version": r.checkpoint_version, "metrics": r.metrics}
            for i, r in enumerate(results)
        ],
        "checkpoint_version": f"{checkpoint_version(digest, arrays.data_version, steps)}-m{kept}",
    }
