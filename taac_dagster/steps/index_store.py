"""Publishing a Faiss index folder: the model code writes its files, this swaps the folder in atomically."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.index_files import index_metadata, write_index_files
from models.retrieval import ItemIndex
from taac_dagster.atomic import atomic_dir


def save_index(path: str | Path, index: ItemIndex, metadata: Mapping[str, Any]) -> Path:
    """Write ``index`` into the folder ``path`` atomically (index, id map, metadata); the old
    complete index stays in place until the new one is complete.

    ``metadata`` must name the checkpoint the vectors came from (``checkpoint_version``, e.g.
    the checkpoint asset's data version); anything else JSON-serializable is kept as is.
    """
    meta = index_metadata(index, metadata)  # refused before any folder is made
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_index_files(tmp, index, meta)
    index.metadata = meta
    return path


__all__ = ["save_index"]
