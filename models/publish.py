"""How the model code writes a file (a checkpoint, the device speed cache, a report, the
submission): through a ``FileWriter`` the caller hands in. The steps layer hands in one that
writes beside the target and renames it into place (``taac_dagster.steps.publish``), so a crash
never leaves half a file where a reader looks; ``write_in_place`` writes the file itself.
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
