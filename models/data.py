"""Training arrays, prepared once from a track's DuckDB warehouse, and vectorized batches.

``prepare_arrays`` reads the warehouse through a read-only connection as Arrow record batches
and writes plain ``.npy`` files (one folder, replaced atomically); ``load_arrays`` maps them
back (copy-on-write memory maps: nothing is read until it is indexed). Batches are built by
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
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from taac_dagster.atomic import atomic_dir
from taac_dagster.db import connect
from taac_dagster.formats import ITEM_MODEL_FEATURES, USER_ARRAY_FEATURES, USER_SPARSE_FEATURES
from taac_dagster.readers.embeddings import iter_embedding_blocks
from taac_dagster.tracks import get_track

log = logging.getLogger(__name__)

ARRAYS_VERSION = 4  # 4: cand_released
# The feature ids the arrays carry, as taac_dagster/formats.py declares them.
ITEM_FEATURES = ITEM_MODEL_FEATURES
USER_SPARSE = USER_SPARSE_FEATURES
USER_MULTI = USER_ARRAY_FEATURES
SID_TABLE = "item_semantic_ids"
SID_INFO_TABLE = "item_semantic_ids_info"  # the codebooks' description, committed with the codes


@dataclass(frozen=True)
class PrepareOptions:
    max_len: int = 100  # history positions kept (the latest ones)
    families: tuple[int, ...] | None = None  # multi-modal families to use (None: all in the warehouse)
    multi_len: int = 8  # values kept per multi-valued user feature
    val_users: int = 4096  # holdout users validated on the target before their test target
    val_seed: int = 0
    use_semantic_ids: bool = True
    # A family whose [item rows, dim] float32 matrix would exceed this is left out of training
    # (with a warning; its Semantic IDs still reach the model): 4.8M items x 4096-d is 78 GB.
    max_mm_bytes: int = 4 << 30
    # Users per block while the holdout and the sequences are streamed to disk: the preparation's
    # memory for them is this times max_len (~70 MB of arrays per 65,536 users at 100), whatever
    # the number of users or events.
    chunk_users: int = 65_536


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


def source_key(warehouse: Path, codebooks_json: Path | None, track: str, options: PrepareOptions) -> str:
    """Cheap identity of the inputs: the warehouse file (size, mtime), the codebooks, the options."""
    stat = warehouse.stat()
    digest = hashlib.blake2b(digest_size=12)
    identity = {k: v for k, v in asdict(options).items() if k != "chunk_users"}  # chunking changes no byte
    digest.update(json.dumps([ARRAYS_VERSION, track, stat.st_size, stat.st_mtime_ns, identity], default=str).encode())
    if codebooks_json is not None and codebooks_json.is_file():
        digest.update(codebooks_json.read_bytes())
    return digest.hexdigest()


def prepare_arrays(
    warehouse: Path,
    out_dir: Path,
    track: str,
    options: PrepareOptions = PrepareOptions(),
    *,
    codebooks_json: Path | None = None,
    reuse: bool = True,
    logger: Any = None,
    settings: Any = None,
) -> Arrays:
    """Arrays of ``warehouse`` in ``out_dir``; reused as they are when the source key matches.
    ``settings`` (TaacSettings) gives the read connection its DuckDB memory and threads."""
    logger = logger or log
    key = source_key(warehouse, codebooks_json, track, options)
    meta_path = out_dir / "meta.json"
    if reuse and meta_path.is_file() and json.loads(meta_path.read_text()).get("source_key") == key:
        logger.info(f"reusing prepared arrays in {out_dir}")
        return load_arrays(out_dir)
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        con = connect(warehouse, settings, read_only=True)
        try:
            meta = _prepare(con, Path(tmp), track, options, codebooks_json, logger)
        finally:
            con.close()
        meta["source_key"] = key
        meta["seconds"] = round(time.perf_counter() - started, 2)
        meta["data_version"] = _digest_folder(Path(tmp))
        (Path(tmp) / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    logger.info(f"prepared arrays in {out_dir} in {meta['seconds']:.1f}s (data version {meta['data_version']})")
    return load_arrays(out_dir)


def _digest_folder(folder: Path) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for path in sorted(folder.glob("*.npy")):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _scalar(con: duckdb.DuckDBPyConnection, sql: str) -> Any:
    return con.execute(sql).fetchall()[0][0]


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    return [row[0] for row in con.execute(f"SELECT column_name FROM (DESCRIBE {table})").fetchall()]


def _has_table(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [table]).fetchall()[0][0])


def _save(folder: Path, name: str, array: np.ndarray) -> None:
    np.save(folder / f"{name}.npy", np.ascontiguousarray(array))


@dataclass
class RowSpace:
    """The item row space (see the module doc): re-ids, then cold candidates by creative id."""

    id_rows: int  # rows 0 .. id_rows - 1 are padding and re-ids
    extra_creative: np.ndarray  # sorted creative ids of the cold rows id_rows ..

    @property
    def n_rows(self) -> int:
        return self.id_rows + len(self.extra_creative)

    @classmethod
    def read(cls, con: duckdb.DuckDBPyConnection) -> RowSpace:
        max_item = int(_scalar(
            con,
            "SELECT greatest((SELECT coalesce(max(item_id), 0) FROM items), (SELECT coalesce(max(item_id), 0) FROM candidates))",
        ))
        extra = con.execute(
            "SELECT DISTINCT creative_id FROM candidates WHERE item_id IS NULL ORDER BY creative_id"
        ).fetchnumpy()["creative_id"].astype(np.int64)
        return cls(max_item + 1, extra)

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


def _prepare(
    con: duckdb.DuckDBPyConnection,
    out: Path,
    track: str,
    options: PrepareOptions,
    codebooks_json: Path | None,
    logger: Any,
) -> dict[str, Any]:
    spec = get_track(track)
    n_actions = len(spec.allowed_actions)
    time_origin = int(_scalar(con, 'SELECT coalesce(min("timestamp"), 0) FROM events'))
    space = RowSpace.read(con)
    vocab = dict(con.execute("SELECT feature_id, vocab_size FROM feature_vocab").fetchall())
    meta: dict[str, Any] = {
        "version": ARRAYS_VERSION,
        "track": track,
        "max_len": options.max_len,
        "n_actions": n_actions,
        "time_origin": time_origin,
        "num_item_rows": space.n_rows,
        "id_rows": space.id_rows,
        "num_cold_rows": int(len(space.extra_creative)),
        "user_sparse": list(USER_SPARSE),
        "user_multi": list(USER_MULTI),
        "multi_len": options.multi_len,
        "options": asdict(options),
    }
    meta.update(_write_item_features(con, out, space, vocab))
    meta.update(_write_multimodal(con, out, space, options, logger))
    meta.update(_write_semantic_ids(con, out, space, options, codebooks_json, logger))
    meta.update(_write_users(con, out, vocab, options))
    holdout = _write_holdout(con, out, options.max_len, time_origin, spec.target_priority, options.chunk_users)
    validation = _write_validation(out, holdout, options)
    meta.update(_write_sequences(
        con, out, options.max_len, time_origin, space.n_rows, n_actions, validation, options.chunk_users
    ))
    meta.update(_write_candidates(con, out, space))
    meta["num_softmax_rows"] = len(softmax_rows(np.load(out / "item_counts.npy"), np.load(out / "cand_rows.npy")))
    meta.update(num_holdout=holdout["rows"], num_val=len(validation["val_users"]),
                num_val_eligible=int(validation["eligible"]))
    logger.info(
        f"arrays: {meta['num_sequences']} sequences ({meta['num_events']} events), {meta['num_holdout']} holdout users "
        f"({meta['num_val']} validated on their previous target), {space.n_rows} item rows "
        f"({meta['num_cold_rows']} cold without id), {meta['num_candidates']} candidates, families {meta['families']}, "
        f"Semantic IDs {'yes' if meta['sid_levels'] else 'no'}"
    )
    return meta


def _write_item_features(
    con: duckdb.DuckDBPyConnection, out: Path, space: RowSpace, vocab: dict[str, int]
) -> dict[str, Any]:
    """Sparse item features per row, clipped to their vocabulary (an unknown value becomes 0 =
    missing), and the raw creative id per row."""
    item_cols = [c[1:] for c in _columns(con, "items") if c.startswith("f") and c[1:] in ITEM_FEATURES]
    cand_cols = set(_columns(con, "candidates"))
    item_feats = np.zeros((space.n_rows, len(item_cols)), np.int32)
    creative = np.zeros(space.n_rows, np.int64)
    select = ", ".join(f"coalesce(f{c}, 0) AS f{c}" for c in item_cols)
    features = f", {select}" if select else ""
    items = con.execute(f"SELECT item_id, coalesce(creative_id, 0) AS creative_id{features} FROM items").fetchnumpy()
    item_rows = items["item_id"].astype(np.int64)
    creative[item_rows] = items["creative_id"]
    for j, c in enumerate(item_cols):
        item_feats[item_rows, j] = items[f"f{c}"]
    if len(space.extra_creative):
        creative[space.id_rows:] = space.extra_creative
        select = ", ".join(f"any_value(coalesce(f{c}, 0)) AS f{c}" if f"f{c}" in cand_cols else f"0 AS f{c}" for c in item_cols)
        cold_features = f", {select}" if select else ""
        cold = con.execute(
            f"SELECT creative_id{cold_features} FROM candidates WHERE item_id IS NULL GROUP BY creative_id ORDER BY creative_id"
        ).fetchnumpy()
        for j, c in enumerate(item_cols):
            item_feats[space.id_rows:, j] = cold[f"f{c}"]
    item_vocab = []
    for j, c in enumerate(item_cols):
        size = int(vocab.get(c, item_feats[:, j].max(initial=0)))
        item_feats[:, j][(item_feats[:, j] < 0) | (item_feats[:, j] > size)] = 0
        item_vocab.append(size)
    _save(out, "item_feats", item_feats)
    _save(out, "item_creative", creative)
    return {"item_features": list(item_cols), "item_vocab": item_vocab}


def _write_multimodal(
    con: duckdb.DuckDBPyConnection, out: Path, space: RowSpace, options: PrepareOptions, logger: Any
) -> dict[str, Any]:
    """One matrix per family present (zeros where an item has none) and the presence mask; the
    family's file is read in blocks, so the matrix is the only copy of the family held."""
    present = {row[0]: (row[1], row[2]) for row in con.execute("SELECT family, dim, path FROM embedding_families").fetchall()}
    families = sorted(present) if options.families is None else [f for f in options.families if f in present]
    for family in list(families):
        size = space.n_rows * int(present[family][0]) * 4
        if size > options.max_mm_bytes:
            logger.warning(
                f"embedding family {family} ({present[family][0]}-d) left out of training: {size / 2**30:.1f} GiB "
                f"for {space.n_rows} item rows exceeds max_mm_bytes ({options.max_mm_bytes / 2**30:.1f} GiB)"
            )
            families.remove(family)
    mm_mask = np.zeros((space.n_rows, len(families)), bool)
    mm_dims = []
    for j, family in enumerate(families):
        dim, path = present[family]
        table = np.zeros((space.n_rows, dim), np.float32)
        for cids, iids, matrix in iter_embedding_blocks(Path(path)):
            rows = space.rows_of(iids.astype(np.int64), cids.astype(np.int64))
            ok = np.flatnonzero(rows >= 0)
            table[rows[ok]] = matrix[ok]
            mm_mask[rows[ok], j] = True
        _save(out, f"item_mm_{family}", table)
        mm_dims.append(int(dim))
        del table
    _save(out, "item_mm_mask", mm_mask)
    return {"families": families, "mm_dims": mm_dims}


def _write_semantic_ids(
    con: duckdb.DuckDBPyConnection, out: Path, space: RowSpace, options: PrepareOptions,
    codebooks_json: Path | None, logger: Any,
) -> dict[str, Any]:
    """Semantic ID codes per row (another asset's table), shifted by one so that 0 is padding.

    Only the RQ levels reach the model: the table's last code disambiguates items that share
    a tuple by their rank inside the group, which carries no meaning another item could share."""
    none = {"sid_levels": 0, "sid_vocab": [], "codebooks": {}}
    if not (options.use_semantic_ids and _has_table(con, SID_TABLE)):
        return none
    info = _semantic_id_info(con, codebooks_json, logger)
    sid = con.sql(f"SELECT coalesce(item_id, -1) AS item_id, creative_id, codes FROM {SID_TABLE}").to_arrow_table()
    lengths, flat = list_parts(sid.column("codes"))
    if not (len(lengths) and lengths.min() == lengths.max() and lengths[0] > 0):
        logger.warning(f"{SID_TABLE}: codes of unequal or zero length; training without Semantic IDs")
        return none
    width = int(lengths[0])
    levels = min(width, int(info.get("levels") or max(1, width - 1)))
    codes = flat.reshape(-1, width)[:, :levels].astype(np.int32) + 1
    rows = space.rows_of(sid.column("item_id").to_numpy().astype(np.int64), sid.column("creative_id").to_numpy().astype(np.int64))
    sids = np.zeros((space.n_rows, levels), np.int32)
    sids[rows[rows >= 0]] = codes[rows >= 0]
    _save(out, "item_sids", sids)
    return {
        "sid_levels": levels,
        "sid_vocab": [int(v) + 1 for v in sids.max(axis=0)],
        "codebooks": {k: info[k] for k in ("levels", "codebook_size", "family", "source") if k in info},
    }


def _semantic_id_info(con: duckdb.DuckDBPyConnection, codebooks_json: Path | None, logger: Any) -> dict[str, Any]:
    """The description of the Semantic IDs in the warehouse: the one committed with the codes
    (a warehouse from before that table: the codebooks folder's). A codebooks folder of another
    build (a crash between its publish and the table's) is named in a warning and not used."""
    folder = json.loads(codebooks_json.read_text()) if codebooks_json is not None and codebooks_json.is_file() else {}
    if not _has_table(con, SID_INFO_TABLE):
        return folder
    info = json.loads(_scalar(con, f"SELECT info FROM {SID_INFO_TABLE}"))
    if folder and folder.get("build_id") != info.get("build_id"):
        logger.warning(
            f"{codebooks_json} is of Semantic ID build {folder.get('build_id')}, the warehouse's codes of build "
            f"{info.get('build_id')}: training follows the warehouse; rerun semantic_id_codebooks to align them"
        )
    return info


def _write_users(con: duckdb.DuckDBPyConnection, out: Path, vocab: dict[str, int], options: PrepareOptions) -> dict[str, Any]:
    """Sparse user features and multi-valued ones (first multi_len values each), by user id."""
    user_cols = set(_columns(con, "users"))
    max_user = int(_scalar(
        con, "SELECT greatest((SELECT coalesce(max(user_id), 0) FROM users), (SELECT coalesce(max(user_id), 0) FROM sequences))"
    ))
    sparse_names = [c for c in USER_SPARSE if f"f{c}" in user_cols]
    multi_names = [c for c in USER_MULTI if f"f{c}" in user_cols]
    cols = ", ".join(["user_id"] + [f"f{c}" for c in sparse_names + multi_names])
    users = con.sql(f"SELECT {cols} FROM users").to_arrow_table()
    user_ids = users.column("user_id").to_numpy().astype(np.int64)
    sparse_rows, multi_rows, user_vocab = encode_user_features(users, vocab, options.multi_len)
    user_sparse = np.zeros((max_user + 1, len(USER_SPARSE)), np.int32)
    user_multi = np.zeros((max_user + 1, len(USER_MULTI), options.multi_len), np.int32)
    user_sparse[user_ids], user_multi[user_ids] = sparse_rows, multi_rows
    _save(out, "user_sparse", user_sparse)
    _save(out, "user_multi", user_multi)
    return {"num_user_rows": max_user + 1, "user_vocab": user_vocab}


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


def user_blocks(
    con: duckdb.DuckDBPyConnection, table: str, columns: str, chunk_users: int
) -> Iterator[pa.RecordBatch]:
    """``table`` in user-id order, one range of about ``chunk_users`` users per batch.

    Each range is its own query (``user_id`` bounds, sorted inside the range), so the sort never
    holds more than a range: memory is bounded by ``chunk_users`` times the longest history, not
    by the table. The warehouse writes these tables in user order, so the bounds prune whole row
    groups and a range reads little more than its own rows."""
    ids = np.sort(con.execute(f"SELECT user_id FROM {table}").fetchnumpy()["user_id"].astype(np.int64))
    if not len(ids):
        return
    bounds = np.unique(ids[:: max(1, chunk_users)])
    for j, lo in enumerate(bounds):
        upper = "" if j + 1 == len(bounds) else f" AND user_id < {int(bounds[j + 1])}"
        sql = f"SELECT {columns} FROM {table} WHERE user_id >= {int(lo)}{upper} ORDER BY user_id"
        yield from con.sql(sql).to_arrow_reader(chunk_users)


def _write_holdout(
    con: duckdb.DuckDBPyConnection, out: Path, L: int, time_origin: int, target_priority: tuple[int, ...],
    chunk_users: int,
) -> dict[str, Any]:
    """The test targets: the history before each target, the target, every positive from it on,
    streamed to disk in ranges of users. Returns the holdout's size and, per row, the column of
    the history's own previous target (``previous_target_columns``; -1: none), which validation
    samples from."""
    n = int(_scalar(con, "SELECT count(*) FROM holdout"))
    width = int(max(1, min(L, _scalar(con, "SELECT coalesce(max(len(target_item_ids)), 1) FROM holdout") or 1)))
    shapes = {
        "hold_items": (np.int32, (n, L)), "hold_actions": (np.int8, (n, L)), "hold_times": (np.int32, (n, L)),
        "hold_users": (np.int32, (n,)), "hold_target": (np.int32, (n,)), "hold_target_action": (np.int8, (n,)),
        "hold_targets": (np.int32, (n, width)), "hold_target_actions": (np.int8, (n, width)),
    }
    files = {name: NpyAppender(out / f"{name}.npy", dtype, shape) for name, (dtype, shape) in shapes.items()}
    previous = np.full(n, -1, np.int64)
    lo = 0
    columns = """user_id, target_item_id, target_action_type, history_item_ids, history_action_types,
                 history_timestamps, target_item_ids, target_action_types"""
    try:
        for batch in user_blocks(con, "holdout", columns, chunk_users):
            lengths, flat = list_parts(batch.column("history_item_ids"))
            items = pad_lists(lengths, flat.astype(np.int32), L, np.int32, left=True)
            _, flat = list_parts(batch.column("history_action_types"))
            actions = pad_lists(lengths, flat.astype(np.int8), L, np.int8, left=True)
            _, flat = list_parts(batch.column("history_timestamps"))
            times = pad_lists(lengths, _relative_times(flat, time_origin), L, np.int32, left=True)
            t_lengths, flat = list_parts(batch.column("target_item_ids"))
            targets = pad_lists(t_lengths, flat.astype(np.int32), width, np.int32, left=False)
            _, flat = list_parts(batch.column("target_action_types"))
            target_actions = pad_lists(t_lengths, flat.astype(np.int8), width, np.int8, left=False)
            files["hold_items"].append(items)
            files["hold_actions"].append(actions)
            files["hold_times"].append(times)
            files["hold_users"].append(batch.column("user_id").to_numpy().astype(np.int32))
            files["hold_target"].append(batch.column("target_item_id").to_numpy().astype(np.int32))
            files["hold_target_action"].append(batch.column("target_action_type").to_numpy().astype(np.int8))
            files["hold_targets"].append(targets)
            files["hold_target_actions"].append(target_actions)
            previous[lo:lo + batch.num_rows] = previous_target_columns(items, actions, target_priority)
            lo += batch.num_rows
    finally:
        for file in files.values():
            file.handle.close()
    for file in files.values():
        file.close()
    return {"rows": n, "previous_column": previous}


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


def _write_validation(out: Path, holdout: dict[str, Any], options: PrepareOptions) -> dict[str, Any]:
    """Validation that never sees a test target: for a deterministic sample of ``val_users``
    holdout users, the target *before* their test target (chosen by the holdout's own rule)
    with the history strictly before it. Those users' training sequences are cut at the same
    point (``_write_sequences``), so the validation target is never trained on; the test
    history still holds it, as input. Only the sampled rows are read back from the holdout."""
    column = holdout["previous_column"]
    eligible = np.flatnonzero(column >= 0)
    rng = np.random.default_rng(options.val_seed)
    rows = np.sort(rng.permutation(eligible)[: options.val_users]) if len(eligible) else eligible
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
        _save(out, name, array)
    return {**val, "eligible": len(eligible)}


def _write_sequences(
    con: duckdb.DuckDBPyConnection, out: Path, L: int, time_origin: int, n_rows: int, n_actions: int,
    validation: dict[str, Any], chunk_users: int,
) -> dict[str, Any]:
    """Training sequences, streamed in ranges of users straight to disk; a validation user's
    sequence is its validation history (it ends before the validation target). Item popularity
    per action type counts what training sees."""
    n_seq = int(_scalar(con, "SELECT count(*) FROM sequences"))
    files = {
        "seq_items": NpyAppender(out / "seq_items.npy", np.int32, (n_seq, L)),
        "seq_actions": NpyAppender(out / "seq_actions.npy", np.int8, (n_seq, L)),
        "seq_times": NpyAppender(out / "seq_times.npy", np.int32, (n_seq, L)),
        "seq_users": NpyAppender(out / "seq_users.npy", np.int32, (n_seq,)),
    }
    counts = np.zeros(n_rows * n_actions, np.int64)
    val_users = validation["val_users"].astype(np.int64)  # sorted: the holdout is in user order
    events = 0
    try:
        for batch in user_blocks(con, "sequences", "user_id, item_ids, action_types, timestamps", chunk_users):
            users = batch.column("user_id").to_numpy().astype(np.int64)
            lengths, items_flat = list_parts(batch.column("item_ids"))
            _, actions_flat = list_parts(batch.column("action_types"))
            _, times_flat = list_parts(batch.column("timestamps"))
            items = pad_lists(lengths, items_flat.astype(np.int32), L, np.int32, left=True)
            actions = pad_lists(lengths, actions_flat.astype(np.int8), L, np.int8, left=True)
            times = pad_lists(lengths, _relative_times(times_flat, time_origin), L, np.int32, left=True)
            if len(val_users):
                pos = np.minimum(np.searchsorted(val_users, users), len(val_users) - 1)
                hit = np.flatnonzero(val_users[pos] == users)
                items[hit] = validation["val_items"][pos[hit]]
                actions[hit] = validation["val_actions"][pos[hit]]
                times[hit] = validation["val_times"][pos[hit]]
            files["seq_items"].append(items)
            files["seq_actions"].append(actions)
            files["seq_times"].append(times)
            files["seq_users"].append(users.astype(np.int32))
            kept = items > 0
            counts += np.bincount(items[kept].astype(np.int64) * n_actions + actions[kept], minlength=n_rows * n_actions)
            events += int(kept.sum())
    finally:
        for file in files.values():
            file.handle.close()
    for file in files.values():
        file.close()
    _save(out, "item_counts", counts.reshape(n_rows, n_actions))
    return {"num_sequences": n_seq, "num_events": events}


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


def _write_candidates(con: duckdb.DuckDBPyConnection, out: Path, space: RowSpace) -> dict[str, Any]:
    """The candidate pool, in retrieval-id order."""
    cand = con.execute(
        "SELECT coalesce(item_id, -1) AS item_id, creative_id, retrieval_id, is_cold, released FROM candidates "
        "ORDER BY retrieval_id"
    ).fetchnumpy()
    cand_rows = space.rows_of(cand["item_id"].astype(np.int64), cand["creative_id"].astype(np.int64))
    if (cand_rows < 0).any():
        raise ValueError(f"{int((cand_rows < 0).sum())} candidates have no item row")
    _save(out, "cand_rows", cand_rows.astype(np.int32))
    _save(out, "cand_creative", cand["creative_id"].astype(np.int64))
    _save(out, "cand_retrieval", cand["retrieval_id"].astype(np.int64))
    _save(out, "cand_cold", np.asarray(cand["is_cold"], bool))
    released = np.asarray(cand["released"], bool)
    _save(out, "cand_released", released)
    return {"num_candidates": int(len(cand_rows)), "num_released": int(released.sum())}


def encode_user_features(
    users: pa.Table, vocab: dict[str, int], multi_len: int
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """User feature columns ``f<id>`` of ``users`` (one row per user) as model inputs:
    sparse [n, 4] and multi-valued [n, 4, multi_len] (first values kept), 0 = missing. A value
    outside ``vocab[id]`` (0 or absent: the column's max) becomes 0. Returns the sizes used."""
    n = users.num_rows
    names = set(users.column_names)
    sparse = np.zeros((n, len(USER_SPARSE)), np.int32)
    multi = np.zeros((n, len(USER_MULTI), multi_len), np.int32)
    sizes: dict[str, int] = {}
    for j, c in enumerate(USER_SPARSE):
        size = int(vocab.get(c, 0))
        if f"f{c}" in names:
            values = users.column(f"f{c}").fill_null(0).to_numpy().astype(np.int64)
            size = size or int(values.max(initial=0))
            values[(values < 0) | (values > size)] = 0
            sparse[:, j] = values
        sizes[c] = size
    for j, c in enumerate(USER_MULTI):
        size = int(vocab.get(c, 0))
        if f"f{c}" in names:
            lengths, values = list_parts(users.column(f"f{c}"))
            values = values.astype(np.int64)
            size = size or int(values.max(initial=0))
            values[(values < 0) | (values > size)] = 0
            multi[:, j] = pad_lists(lengths, values, multi_len, np.int32, left=False)
        sizes[c] = size
    return sparse, multi, sizes


def _relative_times(timestamps: np.ndarray, origin: int) -> np.ndarray:
    rel = timestamps.astype(np.int64) - origin
    if len(rel) and (rel.min() < 0 or rel.max() >= 2**31):
        raise ValueError(f"timestamps span more than 68 years from {origin}: cannot store as int32 seconds")
    return rel.astype(np.int32)


# --- Batches ----------------------------------------------------------------------------------


@dataclass
class NegativeSpec:
    """Which negatives a batch carries (the loss decides how to use them)."""

    in_batch: int = 0  # target items drawn from other positions of the global batch (not with batch_items)
    # Distinct items of the global batch's sequences used as negatives (the item tower embeds
    # them anyway): all of them up to this many, else a uniform subset of this size; log Q is
    # then the probability that an item is among them. 0: none.
    batch_items: int = 0
    sampled: int = 0  # items drawn from the sampler, shared by the whole batch
    # Uniform draws from the candidate pool (cold items included), shared by the whole batch:
    # the items retrieval scores but training sequences may never hold. 0: none.
    pool: int = 0
    per_position: int = 0  # one sampled item per position (the official baseline's BCE), 0 or 1
    # Per-position negatives are drawn from a shared pool of this many sampled items (each
    # position's negative is still a draw from the sampler); the item tower then embeds a few
    # thousand negatives per step instead of one per position. 0: independent draws.
    per_position_pool: int = 4096
    sampler: str = "popularity"  # "popularity" (counts ** alpha) or "uniform" (over trained items)
    alpha: float = 1.0
    logq: bool = True
    # Also subtract log Q from the positive's logit (Yi et al.): the same formula as for a
    # negative, whether or not the positive's item was drawn among this batch's negatives.
    logq_positive: bool = True


class ItemSampler:
    """Draw item rows by popularity**alpha or uniformly over the items seen in training, in
    O(log n) per draw (inverse CDF); ``log_q`` is the log-probability of each row."""

    def __init__(self, counts: np.ndarray, kind: str = "popularity", alpha: float = 1.0) -> None:
        counts = np.asarray(counts, np.float64)
        seen = counts > 0
        if kind == "popularity":
            weights = np.where(seen, counts, 0.0) ** alpha
        elif kind == "uniform":
            weights = seen.astype(np.float64)
        else:
            raise ValueError(f"unknown sampler {kind!r}: popularity or uniform")
        if weights.sum() <= 0:
            raise ValueError("no item occurs in the training sequences: nothing to sample")
        self.p = weights / weights.sum()
        self.cdf = np.cumsum(self.p)
        self.cdf[-1] = 1.0

    def sample(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
        return np.searchsorted(self.cdf, rng.random(size), side="right").astype(np.int64)


class BatchMaker:
    """Step-addressable batches: ``batch(step)`` is a pure function of (seed, step), so a run
    resumed at step s sees exactly the batches an uninterrupted run would have seen, and every
    rank of a distributed run builds the same global batch and keeps its own slice.

    Epoch e visits the training sequences in ``default_rng([seed, e]).permutation``; the last
    incomplete batch of an epoch is dropped (every step has the same global batch size).
    """

    def __init__(
        self,
        arrays: Arrays,
        batch_size: int,
        *,
        seed: int = 0,
        action_weights: dict[int, float] | None = None,
        negatives: NegativeSpec | None = None,
        rank: int = 0,
        world: int = 1,
        length_buckets: int = 0,
    ) -> None:
        n = arrays.num_sequences
        self.length_buckets = length_buckets
        self.lengths = (np.asarray(arrays.seq_items) > 0).sum(axis=1) if length_buckets else None
        self.arrays = arrays
        self.global_batch = max(world, min(batch_size, n) // world * world)
        if n < world:
            raise ValueError(f"{n} training sequences cannot feed {world} ranks")
        self.steps_per_epoch = n // self.global_batch
        self.seed = seed
        self.rank, self.world = rank, world
        n_actions = arrays.meta["n_actions"]
        weights = action_weights or {a: 1.0 for a in range(n_actions)}
        self.action_weight = np.array([float(weights.get(a, 0.0)) for a in range(n_actions)], np.float32)
        self.neg = negatives or NegativeSpec()
        counts = np.asarray(arrays.item_counts)
        # In-batch negatives are targets of weighted positions: their distribution is the
        # popularity of those positions' items.
        target_counts = (counts * (self.action_weight > 0)).sum(axis=1)
        self.target_q = target_counts / max(target_counts.sum(), 1)
        self.sampler = None
        if self.neg.sampled or self.neg.per_position:
            self.sampler = ItemSampler(counts.sum(axis=1), self.neg.sampler, self.neg.alpha)
        # Share of training positions per item: the chance that one position holds it.
        self.position_p = counts.sum(axis=1) / max(counts.sum(), 1)
        # The candidate pool's rows (each once) and the chance that one uniform draw gives a row.
        self.pool_rows = np.unique(np.asarray(arrays.cand_rows).astype(np.int64)) if self.neg.pool else None
        self.pool_p = None
        if self.neg.pool:
            if not len(self.pool_rows):
                raise ValueError("pool negatives asked for, but the arrays have no candidate rows")
            self.pool_p = np.zeros(len(counts))
            self.pool_p[self.pool_rows] = 1.0 / len(self.pool_rows)
        # logQ: log of the expected number of times an item shows up among the negatives.
        expected = self.neg.in_batch * self.target_q
        if self.neg.sampled:
            expected = expected + self.neg.sampled * self.sampler.p
        if self.neg.pool:
            expected = expected + self.neg.pool * self.pool_p
        self.log_q = np.log(np.maximum(expected, 1e-12)).astype(np.float32)
        self._order: tuple[int, np.ndarray] | None = None

    def inclusion_log_q(self, rows: np.ndarray, positions: int, keep: float) -> np.ndarray:
        """log P(item row is among a ``batch_items`` batch's negatives), for any rows:

            P = 1 - (1 - keep * (1 - (1 - p_pos)^positions)) * (1 - p_sampler)^sampled * (1 - p_pool)^pool

        where p_pos is the item's share of training positions, ``positions`` the batch's
        non-padding positions and ``keep`` the share of its distinct items kept (1: all of
        them). The same number for a negative and for a positive, drawn or not."""
        rows = np.asarray(rows, np.int64)
        absent = positions * np.log1p(-np.minimum(self.position_p[rows], 1 - 1e-9))  # log P(no position holds it)
        in_batch = -np.expm1(np.minimum(absent, -1e-12))  # P(some position holds it)
        absent = np.log1p(-np.minimum(keep * in_batch, 1 - 1e-12))  # log P(not in the kept subset)
        if self.neg.sampled:
            absent = absent + self.neg.sampled * np.log1p(-np.minimum(self.sampler.p[rows], 1 - 1e-9))
        if self.neg.pool:
            absent = absent + self.neg.pool * np.log1p(-np.minimum(self.pool_p[rows], 1 - 1e-9))
        return np.log(-np.expm1(np.minimum(absent, -1e-12))).astype(np.float32)

    def order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s sequence order; batch i is its i-th slice of ``global_batch`` rows.

        With ``length_buckets`` > 0, the shuffled sequences are cut into chunks of that many
        batches, each chunk is sorted by history length and cut into batches, and the batches
        are shuffled: a batch then holds histories of similar length, so trimming it to its
        longest history leaves little padding, while every batch is still a random draw."""
        # Read once: worker threads build batches of two epochs at once around a boundary.
        cached = self._order
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.arrays.num_sequences)
            if self.length_buckets:
                B = self.global_batch
                used = self.steps_per_epoch * B
                chunk = self.length_buckets * B
                for lo in range(0, used, chunk):
                    part = order[lo : min(lo + chunk, used)]
                    order[lo : lo + len(part)] = part[np.argsort(self.lengths[part], kind="stable")]
                batches = order[:used].reshape(self.steps_per_epoch, B)[rng.permutation(self.steps_per_epoch)]
                order[:used] = batches.reshape(-1)
            cached = self._order = (epoch, order)
        return cached[1]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(step, self.steps_per_epoch)
        rows = self.order(epoch)[i * self.global_batch : (i + 1) * self.global_batch]
        rows = np.sort(rows)  # sequential reads of the memory maps; the set is what is random
        return self.make(rows, np.random.default_rng([self.seed, 1_000_003, step]))

    def pool_draws(self, rng: np.random.Generator) -> np.ndarray:
        """``pool`` uniform draws from the candidate pool's rows (none: no random number used)."""
        if not self.neg.pool:
            return np.zeros(0, np.int64)
        return self.pool_rows[rng.integers(0, len(self.pool_rows), self.neg.pool)]

    def make(self, rows: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Global batch of the training sequences ``rows``; this rank's slice is returned."""
        a = self.arrays
        items = np.asarray(a.seq_items[rows])
        # No compute on padding: the batch keeps only as many (right-aligned) columns as its
        # longest history.
        width = history_width(items)
        items = np.ascontiguousarray(items[:, -width:])
        actions = np.asarray(a.seq_actions[rows, -width:]).astype(np.int64)
        weights = self.action_weight[actions] * (items > 0)
        total = float(weights.sum())
        out: dict[str, np.ndarray] = {}
        if self.neg.in_batch:
            candidates = np.flatnonzero(weights.reshape(-1) > 0)
            if len(candidates) == 0:
                candidates = np.flatnonzero(items.reshape(-1) > 0)
            pick = rng.integers(0, len(candidates), self.neg.in_batch)
            in_batch = items.reshape(-1)[candidates[pick]].astype(np.int64)
        else:
            in_batch = np.zeros(0, np.int64)
        sampled = self.sampler.sample(rng, self.neg.sampled) if self.neg.sampled else np.zeros(0, np.int64)
        neg = np.concatenate([in_batch, sampled])
        log_q = lambda rows: self.log_q[rows]  # noqa: E731  (log Q of any item rows)
        if self.neg.batch_items:
            # Each distinct item once: log Q is the log-probability that the item is in the set
            # (inclusion_log_q), for the negatives and for every position's item alike.
            distinct = np.unique(items[items > 0].astype(np.int64))
            keep = min(1.0, self.neg.batch_items / max(1, len(distinct)))
            if keep < 1.0:
                distinct = np.sort(rng.choice(distinct, self.neg.batch_items, replace=False))
            positions = int((items > 0).sum())
            neg = np.unique(np.concatenate([distinct, sampled, self.pool_draws(rng)]))
            log_q = lambda rows: self.inclusion_log_q(rows, positions, keep)  # noqa: E731
            out["neg_items"] = neg
            out["neg_logq"] = log_q(neg) if self.neg.logq else np.zeros(len(neg), np.float32)
        else:
            neg = np.concatenate([neg, self.pool_draws(rng)])
            if len(neg):
                # Each distinct negative once (sorted), its multiplicity folded into log Q: a
                # negative drawn k times weighs k in the softmax denominator, i.e. logit + log k.
                neg, counts = np.unique(neg, return_counts=True)
                base = log_q(neg) if self.neg.logq else np.zeros(len(neg), np.float32)
                out["neg_items"] = neg
                out["neg_logq"] = (base - np.log(counts)).astype(np.float32)
        if self.neg.per_position:
            if self.neg.per_position_pool:
                pool = self.sampler.sample(rng, self.neg.per_position_pool)
                out["pos_neg_items"] = pool[rng.integers(0, len(pool), items.shape)]
            else:
                out["pos_neg_items"] = self.sampler.sample(rng, items.shape)
        # This rank's slice of the per-sequence arrays.
        per_rank = len(rows) // self.world
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        rows, items, actions, weights = rows[mine], items[mine], actions[mine], weights[mine]
        if "pos_neg_items" in out:
            out["pos_neg_items"] = out["pos_neg_items"][mine]
        users = np.asarray(a.seq_users[rows]).astype(np.int64)
        out.update(
            items=items.astype(np.int64),
            actions=actions,
            times=np.asarray(a.seq_times[rows, -width:]).astype(np.int64),
            user_sparse=np.asarray(a.user_sparse[users]).astype(np.int64),
            user_multi=np.asarray(a.user_multi[users]).astype(np.int64),
            weights=weights.astype(np.float32),
            pos_logq=(np.where(items > 0, log_q(items), 0).astype(np.float32)
                      if (self.neg.logq and self.neg.logq_positive and len(neg))
                      else np.zeros(items.shape, np.float32)),
            # The loss is summed over this rank and divided by the global weight total; DDP
            # averages gradients over ranks, so the world size comes back in here.
            loss_scale=np.float32(self.world / max(total, 1e-12)),
        )
        return out


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
