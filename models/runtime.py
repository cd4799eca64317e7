"""Where a model's tensors run: torch's CPU threads, batches copied to the device, and batches
built ahead of a GPU step by worker threads.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from models.batches import BatchMaker


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
