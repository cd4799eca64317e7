"""One writer per track: a file lock on ``<data root>/<track>/.lock`` held by every writing step.

Two runs of the same track would otherwise replace each other's raw data, warehouse, arrays and
checkpoints mid-read. The Dagster run queue limits runs per partition (``dagster/partition``
tag), but ``dagster job execute``, ``dg launch`` and a second instance bypass the queue; the
lock holds whatever started the run. It is an OS lock (``filelock``: ``flock`` on Unix), so
it is released when its holder dies, however it dies.

Beside the lock, ``.lock.holder`` names the holder (run, step, process, machine, since when),
so whoever waits, or is refused, is told who holds the track.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from taac_dagster.atomic import write_text_atomic
from taac_dagster.errors import TaacError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
HOLDER_NAME = ".lock.holder"
# While waiting, a line naming the holder is logged this often (seconds).
WAIT_REPORT_SECONDS = 30.0


class TrackBusyError(TaacError):
    """Another run holds the track's lock and did not release it in time."""


def lock_path(track_root: Path) -> Path:
    return Path(track_root) / LOCK_NAME


def read_holder(track_root: Path) -> dict[str, Any] | None:
    """Who holds (or last held) the lock, as its holder wrote it; None when unknown."""
    try:
        data = json.loads((Path(track_root) / HOLDER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it did not say which run)"
    return (
        f"run {holder.get('run_id') or 'outside Dagster'} (step {holder.get('step')}, pid {holder.get('pid')} "
        f"on {holder.get('host')}, since {holder.get('since')})"
    )


@contextlib.contextmanager
def track_lock(
    track_root: str | Path,
    *,
    track: str,
    step: str,
    run_id: str | None = None,
    timeout: float = 3600.0,
    logger: Any = None,
) -> Iterator[dict[str, Any]]:
    """Hold the track's lock for the body; wait up to ``timeout`` seconds (0: refuse at once)
    for another holder, logging who it is, then raise ``TrackBusyError`` naming it."""
    logger = logger or log
    root = Path(track_root)
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path(root), thread_local=False)
    deadline = time.monotonic() + timeout
    wait = 0.0  # the first attempt does not wait: a busy track is reported at once
    while True:
        try:
            lock.acquire(timeout=wait)
            break
        except Timeout:
            holder = describe_holder(read_holder(root))
            if time.monotonic() >= deadline:
                raise TrackBusyError(
                    f"track {track} is being written by {holder}; step {step}"
                    + (f" of run {run_id}" if run_id else "")
                    + f" gave up after waiting {timeout:.0f}s for {lock_path(root)}. Let that run finish (or stop "
                    "it) and re-run; TAAC_TRACK_LOCK_TIMEOUT sets how long a step waits."
                ) from None
            logger.info(f"waiting for track {track}: {lock_path(root)} is held by {holder}")
            wait = max(0.0, min(WAIT_REPORT_SECONDS, deadline - time.monotonic()))
    holder = {
        "track": track,
        "run_id": None if run_id is None else str(run_id),
        "step": str(step),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        write_text_atomic(root / HOLDER_NAME, json.dumps(holder, indent=1))
        yield holder
    finally:
        with contextlib.suppress(OSError):
            (root / HOLDER_NAME).unlink()
        lock.release()
