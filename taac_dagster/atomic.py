"""Write-then-rename helpers: a crash never leaves a half-written artifact in place.

A temporary sibling is named ``.<name>.tmp-<host>-<pid>-<random>``: the writer that owns it is
in its name, so the clean-up of leftovers removes only temporaries whose writer is gone and
never a neighbour's write in progress. Data and folder entries are flushed to disk (fsync)
before the rename that publishes them, and the parent folder after it, so a power cut cannot
leave a renamed-but-empty file behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

# A temporary whose writer runs on another machine (a shared volume) cannot be probed; it is
# taken as abandoned once nothing in it has changed for this long.
FOREIGN_TEMP_GRACE_SECONDS = 24 * 3600

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
_TEMP = re.compile(r"^\..+\.tmp-(?:(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-)?[0-9a-f]{8}(?:\..*)?$")


def temp_sibling(target: Path, suffix: str = "") -> Path:
    """A fresh temporary path beside ``target`` naming this process as its writer."""
    return target.with_name(f".{target.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform or file system without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``, then ``folder`` itself."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                fsync_file(path)
        fsync_dir(Path(dirpath))


def replace_durably(source: Path, target: Path) -> None:
    """Flush ``source`` (a file or a folder tree), rename it to ``target``, flush the parent."""
    if source.is_dir():
        fsync_tree(source)
    else:
        fsync_file(source)
    os.replace(source, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target, target.suffix)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {target}")
        replace_durably(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target``.

    The old folder is moved aside first and deleted only after the new one is in place, so
    at every instant either the complete old or the complete new folder sits at ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    tmp.mkdir()
    old = None
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            old = temp_sibling(target, ".old")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(target: str | Path, text: str) -> Path:
    with atomic_file(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return False
    return True


def _last_change(path: Path) -> float:
    try:
        latest = path.stat().st_mtime
        if path.is_dir():
            for child in path.iterdir():
                latest = max(latest, child.stat().st_mtime)
        return latest
    except OSError:
        return time.time()


def temp_owner_gone(path: Path, *, now: float | None = None) -> bool:
    """Whether the writer of the temporary ``path`` is gone: its process has ended (same
    machine), nothing in it changed for ``FOREIGN_TEMP_GRACE_SECONDS`` (another machine), or
    it predates owner names (written by an older version of this code)."""
    match = _TEMP.match(path.name)
    if match is None:
        return False
    if match.group("pid") is None:
        return True
    if match.group("host") == _HOST:
        return not _pid_alive(int(match.group("pid")))
    return (now or time.time()) - _last_change(path) > FOREIGN_TEMP_GRACE_SECONDS


def remove_stale_temps(folder: str | Path) -> int:
    """Delete leftovers of interrupted atomic writes (``.<name>.tmp-*``) in ``folder`` whose
    writer is gone; a temporary a running writer still owns is left alone."""
    folder = Path(folder)
    removed = 0
    if folder.is_dir():
        for leftover in folder.glob(".*.tmp-*"):
            if not temp_owner_gone(leftover):
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed += 1
    return removed
