"""The presets' ``auto`` values, decided from the data and the device that trains.

A preset says what a model is; some of its settings only make sense once the data and the
machine are known: whether the whole catalogue fits in the loss, how large the id table may
grow, how much regularization the data wants, how large a batch keeps the device busy. They
are decided here, once, before the model is built, and recorded in the checkpoint's config
(so a checkpoint says what ran, not ``auto``).

The cost of the full softmax is weighed on the device itself: a step's softmax costs
``6 x positions x catalogue rows x width`` FLOPs (its three matrix products, forward and
backward), and the device's speed on that product is measured (the best of a few repeats and
of earlier measurements on the machine, so a busy moment does not decide it). The full
softmax is kept while that part of a step is expected to take at most
``softmax_step_seconds`` (1 s): a 12K-item catalogue with 7-event histories on 2 CPU cores
(~0.1-0.3 s), anything up to ``full_softmax_items`` on a GPU; a 30K-item catalogue with
70-event histories costs seconds a step on 2 cores, where the sampled loss takes a fraction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.publish import FileWriter, write_in_place
from models.train_config import TrainConfig

log = logging.getLogger(__name__)

# Rows of the product timed to measure a device's speed: one chunk of positions, as the
# chunked softmax computes them (models/losses.py).
_PROBE_ROWS = 2048
_speed_cache: dict[tuple[str, int, int], float] = {}


def speed_cache_path() -> Path:
    return Path(os.environ.get("TAAC_DEVICE_SPEED_CACHE", Path.home() / ".cache" / "taac_dagster" / "device_speed.json"))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()} threads"


def matmul_gflops(
    device: torch.device | str, width: int, columns: int, repeats: int = 5, *, writer: FileWriter = write_in_place
) -> float:
    """FP32 GFLOP/s of ``[2048, width] x [width, columns]`` on ``device``: the best of
    ``repeats`` now and of every earlier measurement of this device and shape on this machine
    (kept in ``speed_cache_path()``, written through ``writer``), so that a busy moment does not
    change the model that the ``auto`` rules pick, and a resumed run picks what the interrupted
    one did."""
    device = torch.device(device)
    columns = int(max(1, min(columns, 65_536)))
    key = (str(device), int(width), columns)
    if key in _speed_cache:
        return _speed_cache[key]
    speed = max(_probe(device, width, columns, repeats, writer), _remembered(device, width, columns))
    _speed_cache[key] = speed
    return speed


def _remembered(
    device: torch.device, width: int, columns: int, new: float | None = None, writer: FileWriter = write_in_place
) -> float:
    """The best speed recorded for this device and shape (recording ``new`` if it is better)."""
    path = speed_cache_path()
    name = f"{_device_name(device)}|{width}x{columns}"
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        known = {}  # an unreadable cache is a cache miss
    best = float(known.get(name, 0.0))
    if new is not None and new > best:
        known[name] = best = round(new, 3)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(known, indent=1, sort_keys=True)
            writer(path, lambda target: target.write_text(text))
        except OSError as exc:  # a read-only home still trains, with this run's figure
            log.warning(f"could not record the device speed in {path}: {exc}")
    return best


def _probe(device: torch.device, width: int, columns: int, repeats: int, writer: FileWriter) -> float:
    a = torch.randn(_PROBE_ROWS, width, device=device)
    b = torch.randn(width, columns, device=device)
    out = torch.empty(_PROBE_ROWS, columns, device=device)
    best = math.inf
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first is a warm-up
            best = min(best, time.perf_counter() - started)
    speed = 2.0 * _PROBE_ROWS * width * columns / max(best, 1e-9) / 1e9
    return max(speed, _remembered(device, width, columns, new=speed, writer=writer))


def positions_per_step(meta: dict[str, Any], batch_size: int) -> float:
    """Predicted positions in a step: the batch times the mean training sequence length."""
    sequences = max(1, int(meta.get("num_sequences", 1)))
    per_sequence = min(float(meta.get("max_len", 100)), int(meta.get("num_events", sequences)) / sequences)
    return float(batch_size) * max(1.0, per_sequence)


def softmax_seconds_per_step(meta: dict[str, Any], batch_size: int, width: int, gflops: float) -> float:
    """Expected seconds of the full softmax's three products in one step."""
    rows = int(meta.get("num_softmax_rows", meta.get("num_item_rows", 1)))
    flops = 6.0 * positions_per_step(meta, batch_size) * rows * width
    return flops / max(gflops, 1e-9) / 1e9


def choose_loss(tc: TrainConfig, meta: dict[str, Any], width: int, gflops: float | None) -> tuple[str, str]:
    """``loss: auto``: (loss, why). The full softmax when the catalogue has at most
    ``full_softmax_items`` rows and its products are expected to take at most
    ``softmax_step_seconds`` a step at ``gflops``; else InfoNCE with sampled negatives."""
    rows = int(meta.get("num_softmax_rows", meta.get("num_item_rows", 1)))
    if rows > tc.full_softmax_items:
        return "infonce", f"{rows:,} softmax rows > full_softmax_items {tc.full_softmax_items:,}"
    if gflops is None:
        return "softmax", f"{rows:,} softmax rows <= {tc.full_softmax_items:,} (step cost not weighed)"
    seconds = softmax_seconds_per_step(meta, tc.batch_size, width, gflops)
    figures = f"{rows:,} rows x {positions_per_step(meta, tc.batch_size):,.0f} positions x width {width}: " \
              f"~{seconds:.3f} s a step at {gflops:,.0f} GFLOP/s"
    if seconds <= tc.softmax_step_seconds:
        return "softmax", f"{figures} <= softmax_step_seconds {tc.softmax_step_seconds}"
    return "infonce", f"{figures} > softmax_step_seconds {tc.softmax_step_seconds}"


def resolve_model_settings(
    model: dict[str, Any], tc: TrainConfig, meta: dict[str, Any], *, gflops: float | None = None,
) -> dict[str, Any]:
    """The preset's model settings with the data-dependent ``auto`` values decided (a setting
    the preset leaves out is ``auto``):

    * ``loss: auto``: see ``choose_loss`` (``gflops`` None: the catalogue size alone);
    * ``dropout: auto``: 0.3 up to 1M training events, 0.1 from 100M, log-linear between;
    * ``id_init_std: auto``: zeros when items have features, multi-modal vectors or Semantic
      IDs, else a spread of 0.02;
    * ``loss_excludes_history: auto``: the evaluation's history filter (``exclude_history``);
    * ``id_buckets: auto``: one id row per item while the id table and its two Adam moments fit
      in ``max_id_table_bytes``, else hashed into as many rows as fit (the 10M track's 17.5M
      items at width 64 would take 13 GB).

    ``members`` is decided before, by ``choose_members`` (models/train.py trains them one by one)."""
    out = dict(model)
    width = int(out.get("d_model", 64))
    if out.get("loss", "auto") == "auto":
        out["loss"], why = choose_loss(tc, meta, width, gflops)
        log.info(f"loss auto: {out['loss']} ({why})")
    if out.get("dropout", "auto") == "auto":
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
    if out.get("loss_excludes_history", "auto") == "auto":
        # Train for the ranking that is scored: when the report leaves history items out
        # (TAAC_EVALUATION__EXCLUDE_HISTORY, passed in as the training's exclude_history), the
        # softmax leaves them out too instead of spending the loss on pushing them down.
        out["loss_excludes_history"] = bool(getattr(tc, "exclude_history", False))
    if out.get("id_buckets", "auto") == "auto":
        fits = tc.max_id_table_bytes // (3 * 4 * width)
        out["id_buckets"] = 0 if int(meta["id_rows"]) <= fits else int(fits)
    return out


def choose_members(model: dict[str, Any], tc: TrainConfig, meta: dict[str, Any]) -> tuple[int, str]:
    """``members: auto``: (members, why). The run's sequence budget (``budget_sequences``, or
    what ``epochs`` / ``max_steps`` fix) over what one member needs where early stopping, not
    the budget, ends training (``member_epochs`` passes over the training sequences): that
    many members, at most ``max_members``, and no more id tables than ``max_id_table_bytes``
    holds. A large dataset, whose budget is a few passes, trains one model for all of it.
    Cosine similarity only: the ensemble scores the mean of its members' cosines."""
    if model.get("similarity", "cosine") != "cosine":
        return 1, "an ensemble averages cosine similarities"
    sequences = max(1, int(meta.get("num_sequences", 1)))
    if tc.max_steps is not None:
        budget = int(tc.max_steps) * tc.batch_size
    elif tc.epochs is not None:
        budget = int(tc.epochs) * sequences
    else:
        budget = tc.budget_sequences
    affordable = budget // (tc.member_epochs * sequences)
    # The members train one at a time, but score together: their id tables (float32, no Adam
    # moments) stay within the memory one table and its moments take in training.
    buckets = model.get("id_buckets")  # a number, or auto / unset: one row per item at most
    rows = int(buckets) if isinstance(buckets, int) and buckets > 0 else int(meta["id_rows"])
    table_bytes = 4 * int(model.get("d_model", 64)) * rows
    fits = max(1, tc.max_id_table_bytes // max(1, table_bytes))
    members = int(max(1, min(tc.max_members, affordable, fits)))
    return members, (f"a budget of {budget:,} sequences / ({tc.member_epochs} passes x {sequences:,} sequences) = "
                     f"{affordable}, at most max_members {tc.max_members} and {fits} id tables")


def resolve_train_settings(tc: TrainConfig, meta: dict[str, Any], device: torch.device) -> TrainConfig:
    """The training settings for ``device``: on a GPU the batch is ``cuda_batch_size`` (a
    small batch leaves a GPU waiting on the launch of each step's kernels) with the learning
    rate scaled by the square root of the batch ratio; on a CPU the preset's own values.
    A batch is never larger than the training sequences."""
    if device.type != "cuda" or not tc.cuda_batch_size or tc.cuda_batch_size == tc.batch_size:
        return tc
    sequences = max(1, int(meta.get("num_sequences", tc.cuda_batch_size)))
    batch = int(min(tc.cuda_batch_size, max(tc.batch_size, sequences // 8)))
    if batch == tc.batch_size:
        return tc
    ratio = math.sqrt(batch / tc.batch_size)
    return dataclasses.replace(tc, batch_size=batch, lr=tc.lr * ratio,
                               sparse_lr=tc.sparse_lr * ratio if tc.sparse_lr else None)
