"""A saved index: one folder of three files, and the checks that refuse a folder whose parts disagree.

    <folder>/index.faiss       faiss.write_index
    <folder>/ids.npy           int64 row -> id
    <folder>/metadata.json     format, spec, dim, pool size, id-map hash, checkpoint version, ...

``write_index_files`` writes them into the folder it is given; the pipeline publishes that
folder atomically (``taac_dagster.steps.index.save_index``: the old complete index stays
in place until the new one is complete). ``load_index`` refuses a folder whose parts disagree,
or one built from another checkpoint, and checks the index file's declared sizes before faiss
reads it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np

from models.index_spec import IndexSpec
from models.retrieval import ItemIndex, pool_fingerprint, set_threads
from models.retrieval_errors import IndexMismatchError, RetrievalError

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
METADATA_FILE = "metadata.json"


def index_metadata(index: ItemIndex, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What ``write_index_files`` records for ``index``: its own metadata, ``metadata``, and its
    format, spec, dimension, pool size and id-map fingerprint.

    ``metadata`` must name the checkpoint the vectors came from (``checkpoint_version``, e.g.
    the checkpoint asset's data version); anything else JSON-serializable is kept as is.
    """
    if not metadata.get("checkpoint_version"):
        raise RetrievalError("save_index needs metadata['checkpoint_version'] (the checkpoint's data version)")
    return {
        **index.metadata,
        **dict(metadata),
        "format_version": FORMAT_VERSION,
        "spec": index.spec.to_json(),
        "dim": index.dim,
        "pool_size": index.size,
        "pool_fingerprint": pool_fingerprint(index.ids),
        "faiss_version": faiss.__version__,
    }


def write_index_files(folder: Path, index: ItemIndex, meta: Mapping[str, Any]) -> None:
    """Write ``index`` (index, id map) and ``meta`` (from ``index_metadata``) into ``folder``."""
    faiss.write_index(index.index, str(folder / INDEX_FILE))
    np.save(folder / IDS_FILE, index.ids)
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


_FLAT_FOURCCS = (b"IxFI", b"IxF2", b"IxFl")


class _IndexFileWalk:
    """Reads an index file's header fields and steps over its arrays, refusing any part that runs
    past the end of the file (the layout: faiss/impl/index_read.cpp, read_index)."""

    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self.handle, self.path, self.left = handle, path, path.stat().st_size

    def _refuse(self, expected: str, found: str) -> IndexMismatchError:
        return IndexMismatchError(
            f"{self.path}: expected {expected}; found {found}: the file is damaged or not one save_index wrote; "
            "rebuild the index"
        )

    def _claim(self, size: int, what: str) -> None:
        if size > self.left:
            found = f"{what} of {size:,} bytes where {self.left:,} are left"
            raise self._refuse("a faiss index whose parts fit in the file", found)
        self.left -= size

    def read(self, size: int, what: str) -> bytes:
        self._claim(size, what)
        return self.handle.read(size)

    def fields(self, layout: str, what: str) -> tuple[Any, ...]:
        return struct.unpack("<" + layout, self.read(struct.calcsize("<" + layout), what))

    def array(self, item_size: int, what: str) -> int:
        """Step over a faiss vector (its item count, uint64, then its items); its item count."""
        (count,) = self.fields("Q", what)
        self._claim(count * item_size, what)
        self.handle.seek(count * item_size, os.SEEK_CUR)
        return count

    def index(self, kinds: tuple[bytes, ...] = (*_FLAT_FOURCCS, b"IHNf", b"IwFl")) -> int:
        """Walk one index of a kind build_index writes (flat; HNSW or IVF over flat); its ntotal."""
        (fourcc,) = self.fields("4s", "index type")
        if fourcc not in kinds:
            raise self._refuse(f"a faiss index of type {' or '.join(k.decode() for k in kinds)}", f"type {fourcc!r}")
        d, ntotal, _, _, _, metric = self.fields("iqqq?i", "index header")  # 2 dummies, is_trained
        if metric > 1:
            self.fields("f", "metric argument")
        if fourcc in _FLAT_FOURCCS:
            floats = self.array(4, "vectors")
            if d < 1 or floats != ntotal * d:  # faiss checks this after reading; IVF needs it before
                raise self._refuse(f"{ntotal:,} vectors of dimension {d}", f"{floats:,} floats")
        elif fourcc == b"IHNf":
            for item_size, what in ((8, "level probabilities"), (4, "neighbours per level"), (4, "levels"),
                                    (8, "offsets"), (4, "neighbours")):
                self.array(item_size, f"HNSW {what}")
            self.fields("5i", "HNSW parameters")
            self.index(_FLAT_FOURCCS)  # the vectors
        else:  # IVF-flat
            nlist, _ = self.fields("QQ", "IVF header")
            self.inverted_lists(nlist, centroids=self.index(_FLAT_FOURCCS))
        return ntotal

    def inverted_lists(self, nlist: int, centroids: int) -> None:
        (direct_map,) = self.fields("b", "IVF direct map")
        self.array(8, "IVF direct map")
        if direct_map == 2:  # a hash table: (id, offset) pairs
            self.array(16, "IVF direct map")
        fourcc, lists, code_size, layout = self.fields("4sQQ4s", "IVF lists header")
        # faiss makes a table per list before it reads any: the lists must be the centroids'
        if fourcc != b"ilar" or not lists == nlist <= centroids or layout not in (b"full", b"sprs"):
            found = f"{fourcc!r} {layout!r} with {lists:,} lists"
            raise self._refuse(f"IVF lists ('ilar'), one per centroid ({centroids:,})", found)
        (count,) = self.fields("Q", "IVF list sizes")
        sizes = np.frombuffer(self.read(8 * count, "IVF list sizes"), dtype=np.uint64)
        if layout == b"sprs":  # (list, size) pairs for the lists that are not empty
            sizes = sizes[1::2]
        self._claim(sum(int(size) for size in sizes) * (code_size + 8), "IVF lists (codes and ids)")


def check_index_file(path: Path) -> None:
    """Refuse an index file whose header declares more data than the file holds: faiss sizes its
    arrays from the header before reading them, so a 365-byte file could make it allocate 1 GB."""
    with open(path, "rb") as handle:
        _IndexFileWalk(handle, path).index()


def read_index_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise IndexMismatchError(f"{path}: no saved index here ({METADATA_FILE} is missing)")
    return json.loads(meta_path.read_text())


def load_index(
    path: str | Path,
    *,
    expected_checkpoint_version: str | None = None,
    expected: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> ItemIndex:
    """Read a folder written by ``write_index_files`` and check that its parts agree.

    Refuses (``IndexMismatchError``) an index built from another checkpoint than
    ``expected_checkpoint_version``, and one whose metadata differs from ``expected`` on any
    of its keys (e.g. ``{"dim": 64, "pool_fingerprint": pool_fingerprint(candidate ids)}``).
    """
    path = Path(path)
    meta = read_index_metadata(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise IndexMismatchError(f"{path}: index format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    if expected_checkpoint_version is not None and meta.get("checkpoint_version") != expected_checkpoint_version:
        raise IndexMismatchError(
            f"{path}: the index was built from checkpoint {meta.get('checkpoint_version')!r}, not the current "
            f"checkpoint {expected_checkpoint_version!r}; rebuild the index"
        )
    for key, want in (expected or {}).items():
        if meta.get(key) != want:
            raise IndexMismatchError(
                f"{path}: index metadata {key}={meta.get(key)!r}, expected {want!r}; rebuild the index"
            )
    set_threads(threads)
    check_index_file(path / INDEX_FILE)
    raw = faiss.read_index(str(path / INDEX_FILE))
    ids = np.load(path / IDS_FILE)
    spec = IndexSpec.from_json(meta["spec"])
    problems = []
    if raw.d != meta.get("dim"):
        problems.append(f"faiss dim {raw.d} vs metadata dim {meta.get('dim')}")
    if raw.ntotal != meta.get("pool_size") or len(ids) != meta.get("pool_size"):
        problems.append(f"{raw.ntotal} vectors and {len(ids)} ids vs metadata pool size {meta.get('pool_size')}")
    if pool_fingerprint(ids) != meta.get("pool_fingerprint"):
        problems.append("the id map's fingerprint differs from the metadata's")
    kind = "ivf" if faiss.try_extract_index_ivf(raw) is not None else "hnsw" if hasattr(raw, "hnsw") else "flat"
    if kind != spec.kind:
        problems.append(f"faiss index type {type(raw).__name__} vs spec kind {spec.kind!r}")
    if problems:
        raise IndexMismatchError(f"{path}: the saved index is inconsistent: " + "; ".join(problems))
    return ItemIndex(index=raw, ids=ids, spec=spec, metadata=meta)


__all__ = [
    "FORMAT_VERSION",
    "IDS_FILE",
    "INDEX_FILE",
    "METADATA_FILE",
    "check_index_file",
    "index_metadata",
    "load_index",
    "read_index_metadata",
    "write_index_files",
]
