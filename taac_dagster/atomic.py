"""Write-then-rename helpers: a crash never leaves a half-written artifact in place."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _temp_sibling(target: Path, suffix: str = "") -> Path:
    return target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target, target.suffix)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {target}")
        os.replace(tmp, target)
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
    tmp = _temp_sibling(target)
    tmp.mkdir()
    old = None
    try:
        yield tmp
        if target.exists():
            old = _temp_sibling(target, ".old")
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(target: str | Path, text: str) -> Path:
    with atomic_file(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def remove_stale_temps(folder: str | Path) -> int:
    """Delete leftovers of interrupted atomic writes (``.<name>.tmp-*``) in ``folder``."""
    folder = Path(folder)
    removed = 0
    if folder.is_dir():
        for leftover in folder.glob(".*.tmp-*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed += 1
    return removed
