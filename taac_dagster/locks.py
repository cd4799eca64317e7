"""One writer per track: a file lock on ``<data root>/<track>/.lock`` held by every writing step.

Two runs of the same track would otherwise replace each other's raw data, warehouse, arrays and
checkpoints mid-read. The Dagster run queue limits runs per partition (``dagster/partition``
tag), but ``dagster job execute``, ``dg launch`` and a second instance bypass the queue; the
lock holds whatever started the run. It is an OS lock (``filelock``: ``flock`` on Unix), so
it is released when its holder dies, however it dies.

Beside the lock, ``.lock.holder`` names the holder (run, step, process, machine, since when),
so whoever waits, or is refused, is told who holds the track.

The lock is per step; a run is several steps, and between two of them another run could take
the track and republish what the first one reads next. So a step of a Dagster run also claims
the track's *run lease* (``.run_lease``: run id, renewed at each of its steps' start and end)
while it holds the lock. A step of another run finds the lease taken and waits, lock released,
until the owner run has ended (its status in the instance, when the lease was written by the
same instance) or the lease has not been renewed for ``lease_ttl`` seconds (a run of another
instance, or one that died without its status being updated).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
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
# How often a step waiting for another run's lease looks again (the lock is free meanwhile).
LEASE_POLL_SECONDS = 5.0


class TrackBusyError(TaacError):
    """Another run holds the track's lock and did not release it in time."""


class LockUnsupportedError(TaacError):
    """The data root's file system has no ``flock``: no lock that ends with its holder."""


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


LEASE_NAME = ".run_lease"


def _os_lock(path: Path) -> FileLock:
    """An OS lock (``flock``) on ``path``, never filelock's soft fallback (a marker file) on a file
    system without flock: a soft lock outlives a killed holder. Older filelock versions have no
    fallback to turn off."""
    try:
        return FileLock(path, thread_local=False, fallback_to_soft=False)
    except TypeError:
        return FileLock(path, thread_local=False)


def read_lease(track_root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(track_root) / LEASE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("run_id") else None


def lease_blocks(
    lease: dict[str, Any] | None, run_id: str, run_finished: Callable[[str], bool | None] | None, ttl: float,
    *, now: float | None = None,
) -> bool:
    """Whether ``lease`` (another run's) keeps ``run_id`` out of the track: its run has not ended
    (``run_finished``: True ended, False running, None unknown to this instance) and it was
    renewed less than ``ttl`` seconds ago."""
    if lease is None or lease.get("run_id") == run_id:
        return False
    if (now or time.time()) - float(lease.get("renewed", 0)) > ttl:
        return False
    return not (run_finished is not None and run_finished(str(lease["run_id"])) is True)


def _write_lease(root: Path, run_id: str, since: str | None) -> None:
    now = time.time()
    lease = {"run_id": run_id, "since": since or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "renewed": now,
             "host": socket.gethostname()}
    write_text_atomic(root / LEASE_NAME, json.dumps(lease, indent=1))


@contextlib.contextmanager
def track_lock(
    track_root: str | Path,
    *,
    track: str,
    step: str,
    run_id: str | None = None,
    timeout: float = 3600.0,
    logger: logging.Logger | None = None,
    run_finished: Callable[[str], bool | None] | None = None,
    lease_ttl: float = 600.0,
) -> Iterator[dict[str, Any]]:
    """Hold the track's lock for the body; wait up to ``timeout`` seconds (0: refuse at once)
    for another holder, logging who it is, then raise ``TrackBusyError`` naming it. With
    ``run_finished`` (a Dagster run's step: it tells whether a run id has ended) the step also
    claims the track's run lease (see the module doc)."""
    logger = logger or log
    leased = run_id is not None and run_finished is not None
    root = Path(track_root)
    root.mkdir(parents=True, exist_ok=True)
    lock = _os_lock(lock_path(root))
    deadline = time.monotonic() + timeout
    wait = 0.0  # the first attempt does not wait: a busy track is reported at once
    while True:
        holder = _acquire(lock, root, wait)
        between_steps = False
        if holder is None:
            holder = _lease_holder(root, str(run_id), run_finished, lease_ttl) if leased else None
            if holder is None:
                break
            lock.release()
            between_steps = True
        if time.monotonic() >= deadline:
            raise TrackBusyError(
                f"track {track} is being written by {holder}; step {step}"
                + (f" of run {run_id}" if run_id else "")
                + f" gave up after waiting {timeout:.0f}s for {lock_path(root)}. Let that run finish (or stop "
                "it) and re-run; TAAC_TRACK_LOCK_TIMEOUT sets how long a step waits."
            ) from None
        wait = max(0.0, min(WAIT_REPORT_SECONDS, deadline - time.monotonic()))
        if between_steps:  # the lock is free: look again at the lease, not at the lock
            logger.info(f"waiting for track {track}: {holder}")
            time.sleep(min(LEASE_POLL_SECONDS, wait))
        else:
            logger.info(f"waiting for track {track}: {lock_path(root)} is held by {holder}")
    try:
        yield _claim(root, track, step, run_id, leased=leased)
        if leased:
            _write_lease(root, str(run_id), (read_lease(root) or {}).get("since"))  # renewed at the step's end
    finally:
        with contextlib.suppress(OSError):
            (root / HOLDER_NAME).unlink()
        lock.release()


def _acquire(lock: FileLock, root: Path, wait: float) -> str | None:
    """None once ``lock`` is held, else who holds it after ``wait`` seconds."""
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        return describe_holder(read_holder(root))
    except (NotImplementedError, OSError) as error:  # after Timeout, itself an OSError
        if isinstance(error, OSError) and error.errno != errno.ENOSYS:
            raise
        raise LockUnsupportedError(
            f"the file system under {root} does not support flock, so {lock_path(root)} cannot be a lock that "
            "ends with its holder (a soft lock left by a killed step would block the track until removed by hand): "
            "put the data root on a local disk or a file system with flock (NFSv4, not NFSv3 mounted with nolock)"
        ) from error
    return None


def _lease_holder(root: Path, run_id: str, run_finished: Callable[[str], bool | None] | None, ttl: float) -> str | None:
    """The run whose lease keeps ``run_id`` out of the track between that run's steps, or None."""
    lease = read_lease(root)
    if lease is None or not lease_blocks(lease, run_id, run_finished, ttl):
        return None
    return f"run {lease['run_id']} (between its steps: it holds the track's run lease since {lease.get('since')})"


def _claim(root: Path, track: str, step: str, run_id: str | None, *, leased: bool) -> dict[str, Any]:
    """Name the new holder beside the lock and, for a run's step, take or renew the run lease."""
    holder: dict[str, Any] = {
        "track": track,
        "run_id": None if run_id is None else str(run_id),
        "step": str(step),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_text_atomic(root / HOLDER_NAME, json.dumps(holder, indent=1))
    if leased:
        previous = read_lease(root)
        since = previous.get("since") if previous and previous.get("run_id") == str(run_id) else None
        _write_lease(root, str(run_id), since)
    return holder
