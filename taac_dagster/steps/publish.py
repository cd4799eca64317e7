"""The steps' ``publish`` for model code that writes files (models/publish.py): each file is
written beside its target and renamed into place (``taac_dagster.atomic.atomic_file``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from taac_dagster.atomic import atomic_file


def publish_file(path: Path, write: Callable[[Path], object]) -> None:
    with atomic_file(path) as tmp:
        write(tmp)


__all__ = ["publish_file"]
