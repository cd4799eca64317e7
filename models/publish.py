"""How the model code writes a file in the middle of its work (a checkpoint, the device speed
cache): through a ``FileWriter`` that the caller hands in. The steps layer hands in one that
publishes atomically (taac_dagster/steps/training.py); ``write_in_place`` writes the file itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

# writer(path, fill): make ``path`` hold what ``fill`` writes into the path it is given.
FileWriter = Callable[[Path, Callable[[Path], object]], None]


def write_in_place(path: Path, fill: Callable[[Path], object]) -> None:
    """``fill`` writes ``path`` itself: a crash half way leaves half a file (tests, benchmarks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fill(path)
