"""The user vectors artifact: every evaluated user's retrieval query, encoded once per checkpoint.

The evaluation report and the submission score the same users with the same checkpoint, so the
encoder's forward pass over their histories (the evaluation's main cost) runs once, in the
``user_vectors`` asset, and both read its files:

    <root>/<track>/vectors/<preset>/
        holdout.npy     float32 [holdout users, d], in holdout row order
        predict.npy     float32 [predict_seq users, d], the file's users ordered by re-id
                        (only where the local source has a predict_seq.jsonl)
        metadata.json   checkpoint_version, arrays_data_version, dim, actions and, per part,
                        the users it holds and (predict) the fingerprint of the file read

``write_user_vectors`` writes into the folder it is given; the pipeline's step gives it a
temporary folder beside the target and renames it into place (``atomic_dir``), so a crash leaves
the previous vectors whole. A reader names the checkpoint and arrays it needs: vectors
encoded by another checkpoint, from other arrays or from another predict file are refused
(``UserVectorsMismatchError``, which says to re-materialize ``user_vectors``), never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ModelError

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
HOLDOUT, PREDICT = "holdout", "predict"
FIX = "re-materialize user_vectors (it encodes the users with the current checkpoint)"


class UserVectorsMismatchError(ModelError, ValueError):
    """No user vectors for this checkpoint, these arrays or this predict file."""


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (a predict file edited in place is a different file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class UserVectorsWriter:
    """Parts written into the folder of ``write_user_vectors``."""

    folder: Path
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def part(self, name: str, users: int, dim: int, **info: Any) -> np.memmap:
        """A writable float32 [users, dim] array backed by ``<name>.npy``."""
        self.parts[name] = {"users": int(users), **info}
        return np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=np.float32, shape=(users, dim))


@contextlib.contextmanager
def write_user_vectors(folder: str | Path, metadata: dict[str, Any]) -> Iterator[UserVectorsWriter]:
    """Yield a writer of parts into ``folder`` (an empty folder); when the block ends without
    error, the metadata naming every part is written beside them.

    ``metadata`` must name ``checkpoint_version`` and ``arrays_data_version``."""
    for key in ("checkpoint_version", "arrays_data_version"):
        if not metadata.get(key):
            raise ValueError(f"user vectors need metadata[{key!r}]")
    writer = UserVectorsWriter(Path(folder))
    yield writer
    meta = {**metadata, "format_version": FORMAT_VERSION, "parts": writer.parts}
    (Path(folder) / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


def read_user_vectors_metadata(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise UserVectorsMismatchError(f"{folder}: no user vectors here ({METADATA_FILE} is missing); {FIX}")
    return json.loads(path.read_text())


def open_user_vectors(
    folder: str | Path,
    part: str,
    *,
    checkpoint_version: str,
    arrays_data_version: str,
    dim: int,
    fingerprint: str | None = None,
) -> np.ndarray:
    """The vectors of ``part`` (memory-mapped, read-only), refused unless they were encoded by
    this checkpoint from these arrays (and, for a predict part, from this very file)."""
    folder = Path(folder)
    meta = read_user_vectors_metadata(folder)
    expected = {
        "format_version": FORMAT_VERSION,
        "checkpoint_version": checkpoint_version,
        "arrays_data_version": arrays_data_version,
        "dim": int(dim),
    }
    for key, want in expected.items():
        if meta.get(key) != want:
            raise UserVectorsMismatchError(
                f"{folder}: the user vectors were encoded with {key} {meta.get(key)!r}, the current one is {want!r}; {FIX}"
            )
    info = (meta.get("parts") or {}).get(part)
    if info is None:
        raise UserVectorsMismatchError(
            f"{folder}: the user vectors hold no {part!r} part (they hold {sorted(meta.get('parts') or {})}); {FIX}"
        )
    if fingerprint is not None and info.get("fingerprint") != fingerprint:
        raise UserVectorsMismatchError(
            f"{folder}: the {part!r} vectors were encoded from {info.get('path')!r} with sha256 "
            f"{str(info.get('fingerprint'))[:12]}..., the file read now has {fingerprint[:12]}...; {FIX}"
        )
    vectors = np.load(folder / f"{part}.npy", mmap_mode="r")
    if vectors.shape != (info["users"], int(dim)) or vectors.dtype != np.float32:
        raise UserVectorsMismatchError(
            f"{folder / f'{part}.npy'}: expected float32 [{info['users']}, {dim}], "
            f"found {vectors.dtype} {list(vectors.shape)}; {FIX}"
        )
    return vectors


__all__ = [
    "HOLDOUT",
    "PREDICT",
    "UserVectorsMismatchError",
    "UserVectorsWriter",
    "file_fingerprint",
    "open_user_vectors",
    "read_user_vectors_metadata",
    "write_user_vectors",
]
