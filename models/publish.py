"""How model code writes a file it is given: ``publish(path, write)`` has ``write`` write the file
and puts it at ``path``. ``write_in_place`` writes at ``path`` itself; the pipeline's steps pass
one that writes beside it and renames it into place (``taac_dagster.steps.publish``), so a crash
never leaves half a file where a reader looks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

Publish = Callable[[Path, Callable[[Path], object]], None]


def write_in_place(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)


__all__ = ["Publish", "write_in_place"]
