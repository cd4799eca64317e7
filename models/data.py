"""Training arrays: their layout, the numpy pieces that build them, and model inputs from them.

``taac_dagster/steps/arrays.py`` reads a track's warehouse and writes plain ``.npy`` files with
these pieces (one folder, replaced atomically); ``load_arrays`` maps them back (copy-on-write
memory maps: nothing is read until it is indexed). Batches (models/batches.py) are built by
numpy fancy indexing of these matrices: no per-sample Python object ever exists.

The item *row space* is the index every item array shares:

    row 0                    padding
    rows 1 .. max_item_id    item re-ids (``items.item_id``); the row is the id
    rows max_item_id + 1 ..  candidates the indexer does not know (``item_id`` NULL: cold
                             items), ordered by creative id; they have features, maybe a
                             multi-modal embedding and a Semantic ID, but no id embedding

Files (``<root>/<track>/checkpoints/arrays/``):

    seq_items [S, L] int32     training histories, left-padded with 0 (item rows)
    seq_actions [S, L] int8    action type per position
    seq_times [S, L] int32     seconds since meta["time_origin"]
    seq_users [S] int32        user id per sequence
    hold_* [H, L], hold_users, hold_target, hold_target_action   the holdout (test targets)
    hold_targets [H, T] int32, hold_target_actions [H, T] int8   every positive from the target on
    val_* [V, L], val_users, val_target, val_target_action, val_hold_row   validation: for a
                               sample of holdout users the target before their test target
                               (history strictly before it); their training sequence ends
                               there too, so no validation or test target is ever trained on
    item_feats [N, F] int32    sparse item features (0 = missing), columns = meta["item_features"]
    item_mm_<family> [N, D] float32, item_mm_mask [N, families] bool
    item_sids [N, levels + 1] int32   Semantic ID codes + 1 (0 = none)
    item_counts [N, actions] int64    occurrences in training sequences per action type
    item_creative [N] int64    raw creative id per row
    user_sparse [U, 4] int32, user_multi [U, 4, M] int32   user features (0 = missing)
    cand_rows [C] int32, cand_creative [C] int64, cand_retrieval [C] int64, cand_cold [C] bool
    cand_released [C] bool     in the released pool (the one a submission may recommend; the
                               rest are holdout targets the warehouse added, see candidates.sql)
    meta.json                  vocabularies, dims, time origin, data version, source key
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# --- Padding: lists -> matrices, all vectorized ------------------------------------------------


def list_parts(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, flat values) of an Arrow list column; null lists are empty, null values 0."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(column).fill_null(0).to_numpy(zero_copy_only=False)
    return lengths, values


def pad_lists(lengths: np.ndarray, values: np.ndarray, width: int, dtype: Any, *, left: bool) -> np.ndarray:
    """Rows of ``values`` (split by ``lengths``) in a [rows, width] matrix of zeros.

    ``left=True``: right-aligned, the *last* ``width`` values of each list kept (histories);
    ``left=False``: left-aligned, the *first* ``width`` values kept (feature lists).
    """
    n = len(lengths)
    out = np.zeros((n, width), dtype)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    keep = np.minimum(lengths, width)
    first = starts + (lengths - keep if left else 0)
    total = int(keep.sum())
    if total == 0:
        return out
    row = np.repeat(np.arange(n), keep)
    within = np.arange(total) - np.repeat(np.cumsum(keep) - keep, keep)
    col = within + (np.repeat(width - keep, keep) if left else 0)
    out[row, col] = values[np.repeat(first, keep) + within]
    return out


# --- Prepared arrays --------------------------------------------------------------------------


@dataclass
class Arrays:
    """The prepared arrays of one track (numpy, memory-mapped) and their metadata."""

    folder: Path
    meta: dict[str, Any]
    a: dict[str, np.ndarray] = field(repr=False)

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.__dict__["a"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def data_version(self) -> str:
        return self.meta["data_version"]

    @property
    def num_sequences(self) -> int:
        return int(self.meta["num_sequences"])

    @property
    def mm_tables(self) -> list[np.ndarray]:
        return [self.a[f"item_mm_{f}"] for f in self.meta["families"]]


def load_arrays(folder: str | Path) -> Arrays:
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    # mmap_mode="c": copy-on-write, so torch.from_numpy gets a writable view and disk is never touched.
    arrays = {p.stem: np.load(p, mmap_mode="c") for p in sorted(folder.glob("*.npy"))}
    return Arrays(folder, meta, arrays)


@dataclass
class RowSpace:
    """The item row space (see the module doc): re-ids, then cold candidates by creative id."""

    id_rows: int  # rows 0 .. id_rows - 1 are padding and re-ids
    extra_creative: np.ndarray  # sorted creative ids of the cold rows id_rows ..

    @property
    def n_rows(self) -> int:
        return self.id_rows + len(self.extra_creative)

    def rows_of(self, item_ids: np.ndarray, creative_ids: np.ndarray) -> np.ndarray:
        """Row of each (item id or -1, creative id); -1 where the item is in neither space."""
        rows = np.where(item_ids > 0, item_ids, -1).astype(np.int64)
        unknown = rows < 0
        if unknown.any() and len(self.extra_creative):
            pos = np.searchsorted(self.extra_creative, creative_ids[unknown])
            pos = np.minimum(pos, len(self.extra_creative) - 1)
            found = self.extra_creative[pos] == creative_ids[unknown]
            rows[np.flatnonzero(unknown)[found]] = self.id_rows + pos[found]
        return rows


def folder_digest(folder: Path) -> str:
    """Digest of the ``.npy`` files of ``folder`` (names and bytes): the arrays' data version."""
    digest = hashlib.blake2b(digest_size=12)
    for path in sorted(folder.glob("*.npy")):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def save_array(folder: Path, name: str, array: np.ndarray) -> None:
    np.save(folder / f"{name}.npy", np.ascontiguousarray(array))



class NpyAppender:
    """A ``.npy`` file of a known shape written in row blocks through a plain file handle, so
    that what has been written leaves the process (page cache, not the process's memory, as a
    memory map's dirty pages would be)."""

    def __init__(self, path: Path, dtype: Any, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self.rows = 0
        self.handle = open(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self.handle, header)

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path.name}: block of shape {block.shape}, expected rows of {self.shape[1:]}")
        self.handle.write(block.data)
        self.rows += len(block)

    def close(self) -> None:
        self.handle.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path.name}: {self.rows} rows written, {self.shape[0]} declared")


def previous_target_columns(items: np.ndarray, actions: np.ndarray, target_priority: tuple[int, ...]) -> np.ndarray:
    """Column of each history's own last target by the holdout's rule (the last event of the
    first action type of ``target_priority`` present), -1 where the history has none."""
    n, L = items.shape
    column = np.full(n, -1, np.int64)
    for action in target_priority:
        hit = (actions == action) & (items > 0)
        last = L - 1 - np.argmax(hit[:, ::-1], axis=1)
        pick = (column < 0) & hit.any(axis=1)
        column[pick] = last[pick]
    return column


def cut_before(matrix: np.ndarray, column: np.ndarray) -> np.ndarray:
    """Each left-padded row's values strictly before ``column``, right-aligned again."""
    n, L = matrix.shape
    source = np.arange(L)[None, :] - (L - column[:, None])
    return np.where(source >= 0, np.take_along_axis(matrix, np.maximum(source, 0), axis=1), 0).astype(matrix.dtype)


def write_validation(out: Path, column: np.ndarray, val_users: int, val_seed: int) -> dict[str, Any]:
    """Validation that never sees a test target: for a deterministic sample of ``val_users``
    holdout users (``column``: each holdout row's ``previous_target_columns``), the target
    *before* their test target (chosen by the holdout's own rule) with the history strictly
    before it. Those users' training sequences are cut at the same point (taac_dagster/steps/arrays.py's
    ``_write_sequences``), so the validation target is never trained on; the test history still
    holds it, as input. Only the sampled rows are read back from the holdout's files in ``out``."""
    eligible = np.flatnonzero(column >= 0)
    rng = np.random.default_rng(val_seed)
    rows = np.sort(rng.permutation(eligible)[:val_users]) if len(eligible) else eligible
    col = column[rows]
    take = lambda name: np.asarray(np.load(out / f"{name}.npy", mmap_mode="r")[rows])  # noqa: E731
    hold_items, hold_actions = take("hold_items"), take("hold_actions")
    val = {
        "val_hold_row": rows.astype(np.int32),
        "val_users": take("hold_users"),
        "val_items": cut_before(hold_items, col),
        "val_actions": cut_before(hold_actions, col),
        "val_times": cut_before(take("hold_times"), col),
        "val_target": np.take_along_axis(hold_items, col[:, None], axis=1)[:, 0].astype(np.int32),
        "val_target_action": np.take_along_axis(hold_actions, col[:, None], axis=1)[:, 0].astype(np.int8),
    }
    for name, array in val.items():
        save_array(out, name, array)
    return {**val, "eligible": len(eligible)}


def released_mask(arrays: Arrays) -> np.ndarray | None:
    """Pool position -> in the released pool; None when every candidate is (nothing was added)."""
    released = np.asarray(arrays.cand_released, dtype=bool)
    return None if released.all() else released


def softmax_rows(item_counts: np.ndarray, cand_rows: np.ndarray) -> np.ndarray:
    """The full softmax's classes: row 0 (padding), then, sorted, every row that occurs in a
    training sequence or is a candidate. Rows in neither (an indexer may name far more items
    than the data uses: the demo sample's names 58,734 and uses 7,500) are left out."""
    seen = np.flatnonzero(np.asarray(item_counts).sum(axis=1) > 0)
    return np.union1d(np.union1d(seen, np.asarray(cand_rows, np.int64)), [0]).astype(np.int64)


def encode_user_features(
    users: pa.Table, vocab: dict[str, int], multi_len: int, *, sparse_features: Sequence[str], multi_features: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """User feature columns ``f<id>`` of ``users`` (one row per user) as model inputs: sparse
    [n, len(sparse_features)] and multi-valued [n, len(multi_features), multi_len] (first values
    kept), 0 = missing. A value outside ``vocab[id]`` (0 or absent: the column's max) becomes 0.
    Returns the sizes used."""
    n = users.num_rows
    names = set(users.column_names)
    sparse = np.zeros((n, len(sparse_features)), np.int32)
    multi = np.zeros((n, len(multi_features), multi_len), np.int32)
    sizes: dict[str, int] = {}
    for j, c in enumerate(sparse_features):
        size = int(vocab.get(c, 0))
        if f"f{c}" in names:
            values = users.column(f"f{c}").fill_null(0).to_numpy().astype(np.int64)
            size = size or int(values.max(initial=0))
            values[(values < 0) | (values > size)] = 0
            sparse[:, j] = values
        sizes[c] = size
    for j, c in enumerate(multi_features):
        size = int(vocab.get(c, 0))
        if f"f{c}" in names:
            lengths, values = list_parts(users.column(f"f{c}"))
            values = values.astype(np.int64)
            size = size or int(values.max(initial=0))
            values[(values < 0) | (values > size)] = 0
            multi[:, j] = pad_lists(lengths, values, multi_len, np.int32, left=False)
        sizes[c] = size
    return sparse, multi, sizes


def relative_times(timestamps: np.ndarray, origin: int) -> np.ndarray:
    """Seconds since ``origin`` as int32 (68 years either way at most)."""
    rel = timestamps.astype(np.int64) - origin
    if len(rel) and (rel.min() < 0 or rel.max() >= 2**31):
        raise ValueError(f"timestamps span more than 68 years from {origin}: cannot store as int32 seconds")
    return rel.astype(np.int32)


# --- Model inputs ----------------------------------------------------------------------------


def history_width(items: np.ndarray) -> int:
    """Columns that right-aligned histories need: the longest one (at least 1)."""
    return max(1, int((np.asarray(items) > 0).sum(axis=1).max(initial=0)))


POSITION_KEYS = ("items", "actions", "times")


def trim_padding(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch with its per-position arrays cut to the longest history (same vectors: the
    encoder masks padding; this only stops paying for it)."""
    width = history_width(batch["items"])
    if width == batch["items"].shape[1]:
        return batch
    return {k: (v[:, -width:] if k in POSITION_KEYS else v) for k, v in batch.items()}


def history_batch(arrays: Arrays, split: str, index: np.ndarray) -> dict[str, np.ndarray]:
    """Model inputs for rows ``index`` of a split's histories: ``"hold"`` (before each test
    target) or ``"val"`` (before each validation target)."""
    users = np.asarray(arrays.a[f"{split}_users"][index]).astype(np.int64)
    return {
        "items": np.asarray(arrays.a[f"{split}_items"][index]).astype(np.int64),
        "actions": np.asarray(arrays.a[f"{split}_actions"][index]).astype(np.int64),
        "times": np.asarray(arrays.a[f"{split}_times"][index]).astype(np.int64),
        "user_sparse": np.asarray(arrays.user_sparse[users]).astype(np.int64),
        "user_multi": np.asarray(arrays.user_multi[users]).astype(np.int64),
    }


def holdout_batch(arrays: Arrays, index: np.ndarray) -> dict[str, np.ndarray]:
    """Model inputs for holdout rows ``index`` (histories before each test target)."""
    return history_batch(arrays, "hold", index)
