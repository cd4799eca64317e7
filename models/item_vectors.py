"""The vectors Semantic IDs quantize, read item by item: a content family's embeddings
streamed from its parquet file (``FamilyReader``), or vectors already in memory such as the
collaborative ones (``MatrixReader``); both matched to the items to code, in their order.
``ContentCoverage`` says whether a family covers enough items to quantize it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.semantic_ids import chunk_rows


@dataclass
class ContentCoverage:
    """How many items the content family covers, and whether that is enough for Semantic IDs."""

    family: int | None  # None: the warehouse holds no family
    items: int  # items and candidates to code
    items_with_content: int  # of them, those with the family's embedding
    min_items: int  # the least that supports content codes

    @property
    def share(self) -> float:
        return self.items_with_content / self.items if self.items else 0.0

    @property
    def sufficient(self) -> bool:
        return self.family is not None and self.items_with_content >= max(self.min_items, 1)

    def to_metadata(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "items": self.items,
            "items_with_content": self.items_with_content,
            "share": round(self.share, 4),
            "min_items": self.min_items,
            "sufficient": self.sufficient,
        }


def lookup_sorted(sorted_ids: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row in sorted_ids, found mask) for each query id."""
    if len(sorted_ids) == 0:
        return np.zeros(len(query), np.int64), np.zeros(len(query), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, query), len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == query


class FamilyReader:
    """One family's ``emb_<family>.parquet`` (creative_id, item_id, FLOAT[d]), matched to
    ``creative_ids`` and streamed in row batches: the whole matrix is never in memory (4.78M
    items x 4096-d would be 78 GB). A creative id listed twice keeps its first row.

    ``has_embedding[i]``: item i of ``creative_ids`` has a vector; its vector is the
    ``embedded_index``-th, counting embedded items in the order of ``creative_ids``.
    """

    def __init__(self, path: Path, creative_ids: np.ndarray) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        # pre_buffer would keep every column chunk read so far: memory grows to the file size.
        self.handle = pq.ParquetFile(self.path, pre_buffer=False)
        file_ids = self.handle.read(columns=["creative_id"]).column(0).to_numpy().astype(np.int64)
        uniq, first = np.unique(file_ids, return_index=True)
        position, self.has_embedding = lookup_sorted(uniq, np.asarray(creative_ids, np.int64))
        self.n_embedded = int(self.has_embedding.sum())
        # File row -> embedded index (-1: not wanted, or a repeated creative id).
        self.dest = np.full(len(file_ids), -1, np.int64)
        self.dest[first[position[self.has_embedding]]] = np.arange(self.n_embedded)

    def batches(self, wanted: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (embedded indices, float32 vectors) in file order; only ``wanted`` (a sorted
        array of embedded indices) when given."""
        import pyarrow as pa

        emb_type = self.handle.schema_arrow.field("emb").type
        dim = emb_type.list_size if pa.types.is_fixed_size_list(emb_type) else 1024
        offset = 0
        for batch in self.handle.iter_batches(
            columns=["emb"], batch_size=chunk_rows(dim), use_threads=False
        ):
            rows = batch.num_rows
            target = self.dest[offset : offset + rows]
            offset += rows
            take = target >= 0
            if wanted is not None:
                take &= lookup_sorted(wanted, target)[1]
            if not take.any():
                continue
            values = batch.column(0).flatten().to_numpy(zero_copy_only=False)
            matrix = values.reshape(rows, -1)
            yield target[take], np.asarray(matrix[take], np.float32)

    def read(self, wanted: np.ndarray) -> np.ndarray:
        """float32 [len(wanted), d]: the vectors of the sorted embedded indices ``wanted``."""
        out: np.ndarray | None = None
        for index, vectors in self.batches(wanted):
            if out is None:
                out = np.empty((len(wanted), vectors.shape[1]), np.float32)
            out[np.searchsorted(wanted, index)] = vectors
        return out if out is not None else np.empty((0, 0), np.float32)


class MatrixReader:
    """In-memory vectors keyed by item id, read like a ``FamilyReader`` (collaborative vectors).

    ``item_ids`` (sorted) and ``vectors`` row-aligned; ``wanted_item_ids`` in the order of the
    items to code (-1: no re-id, so no vector).
    """

    def __init__(self, item_ids: np.ndarray, vectors: np.ndarray, wanted_item_ids: np.ndarray) -> None:
        position, self.has_embedding = lookup_sorted(np.asarray(item_ids, np.int64), np.asarray(wanted_item_ids, np.int64))
        self.matrix = np.asarray(vectors, np.float32)[position[self.has_embedding]]
        self.n_embedded = len(self.matrix)

    def batches(self, wanted: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        index = np.arange(self.n_embedded) if wanted is None else np.asarray(wanted)
        chunk = chunk_rows(self.matrix.shape[1])
        for lo in range(0, len(index), chunk):
            part = index[lo : lo + chunk]
            yield part, self.matrix[part]

    def read(self, wanted: np.ndarray) -> np.ndarray:
        return self.matrix[np.asarray(wanted)]


@dataclass
class ItemVectors:
    """The vectors the codes quantize, chosen for a track (content family or collaborative)."""

    reader: FamilyReader | MatrixReader
    source: str  # "content:<family>" or "collaborative"
    family: int | None
    dim: int
    coverage: ContentCoverage
    universe: dict[str, np.ndarray]  # every item and candidate: creative_id, item_id, group_key, ...
    collaborative_stats: dict[str, Any] | None = None
