"""Write-then-rename helpers: a crash never leaves a half-written artifact in place.

A temporary sibling is named ``.<name>.tmp-<host>-<pid>-<random>``: the writer that owns it is
in its name, so the clean-up of leftovers removes only temporaries whose writer is gone and
never a neighbour's write in progress. Data and folder entries are flushed to disk (fsync)
before the rename that publishes them, and the parent folder after it, so a power cut cannot
leave a renamed-but-empty file behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

# A temporary whose writer runs on another machine (a shared volume) cannot be probed; it is
# taken as abandoned once nothing in it has changed for this long.
FOREIGN_TEMP_GRACE_SECONDS = 24 * 3600
OLD_SUFFIX = ".old"  # a published copy moved aside while its successor is renamed in

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


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with RENAME_EXCHANGE);
    False where the platform or file system cannot (macOS, NFS, old kernels), so the caller
    falls back to two renames."""
    function = getattr(_libc(), "renameat2", None) if sys.platform.startswith("linux") else None
    if function is None:
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(first), None, str(second))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target``.

    The swap is one atomic exchange where the file system has one, so at every instant either
    the complete old or the complete new folder sits at ``target``. Elsewhere the old folder is
    renamed aside (``.<name>.tmp-<writer>.old``) and the new one into place; a crash between
    the two renames leaves no target for an instant, and the clean-up of leftovers
    (``remove_stale_temps``) puts the old folder back.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    tmp.mkdir()
    old = None
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists() and exchange_paths(tmp, target):
            old = tmp  # the exchange left the previous folder under the temporary name
        else:
            if target.exists():
                old = temp_sibling(target, OLD_SUFFIX)
                os.replace(target, old)
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def target_of(temporary: Path) -> Path | None:
    """The path a temporary sibling was written for (``.<name>.tmp-...`` -> ``<name>``)."""
    match = _TEMP.match(temporary.name)
    return temporary.with_name(temporary.name[1:temporary.name.index(".tmp-")]) if match else None


def remove_entry(path: Path) -> None:
    """Remove ``path``, a folder with its contents or a file; nothing when it is already gone."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(folder: str | Path) -> int:
    """Delete leftovers of interrupted atomic writes (``.<name>.tmp-*``) in ``folder`` whose
    writer is gone; a temporary a running writer still owns is left alone. An old copy set
    aside by a publish that died before its new copy was in place (``.old``, its target
    missing) is put back instead: it is the last complete state."""
    folder = Path(folder)
    removed = 0
    if folder.is_dir():
        for leftover in sorted(folder.glob(".*.tmp-*")):
            if not temp_owner_gone(leftover):
                continue
            target = target_of(leftover)
            if leftover.name.endswith(OLD_SUFFIX) and target is not None and not target.exists():
                os.replace(leftover, target)
                fsync_dir(folder)
                continue
            remove_entry(leftover)
            removed += 1
    return removed


def recover_interrupted_writes(root: str | Path) -> int:
    """``remove_stale_temps`` in every folder under ``root`` (a track's folder): what a killed
    writer left anywhere among the track's artifacts is rolled back or removed before the next
    writer starts. Folders that are themselves temporaries are handled by their parent's turn."""
    removed = 0
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if _TEMP.match(d) is None]
        removed += remove_stale_temps(dirpath)
    return removed


def keep_newest(folder: str | Path, keep: int, *, stamp: str = r"(\d{8}T\d{6}Z[-\w]*)") -> int:
    """Keep the ``keep`` newest builds set aside in ``folder`` (``rejected/``), each the entries
    whose names carry one time stamp (a database and its embeddings folder), and remove the
    rest: a track that keeps failing its checks must not fill the disk. Returns how many
    entries were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    groups: dict[str, list[Path]] = {}
    for entry in folder.iterdir():
        match = re.search(stamp, entry.name)
        if match is not None:
            groups.setdefault(match.group(1), []).append(entry)
    removed = 0
    for key in sorted(groups, reverse=True)[max(0, keep):]:
        for entry in groups[key]:
            remove_entry(entry)
            removed += 1
    return removed
