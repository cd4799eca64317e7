"""The model code's ``FileWriter`` in the pipeline (models/publish.py): ``fill`` writes a
temporary sibling that replaces ``path`` once complete (``taac_dagster.atomic.atomic_file``), so
a run killed while writing keeps the previous file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from taac_dagster.atomic import atomic_file


def publish_file(path: Path, fill: Callable[[Path], object]) -> None:
    with atomic_file(path) as tmp:
        fill(tmp)
