"""A track's training arrays, prepared once from its DuckDB warehouse (the layout: models/data.py).

``prepare_arrays`` reads the warehouse through a read-only connection as Arrow record batches
and writes the ``.npy`` files into a temporary folder, published atomically; a folder whose
source key (warehouse, codebooks, options) matches is reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from models.data import (
    Arrays,
    NpyAppender,
    RowSpace,
    encode_user_features,
    folder_digest,
    list_parts,
    load_arrays,
    pad_lists,
    previous_target_columns,
    relative_times,
    save_array,
    softmax_rows,
    write_validation,
)
from taac_dagster.atomic import atomic_dir
from taac_dagster.db import connect
from taac_dagster.formats import ITEM_MODEL_FEATURES, USER_ARRAY_FEATURES, USER_SPARSE_FEATURES
from taac_dagster.paths import TrackPaths
from taac_dagster.readers.embeddings import iter_embedding_blocks
from taac_dagster.settings import TaacSettings
from taac_dagster.steps.semantic_id_tables import INFO_TABLE as SID_INFO_TABLE
from taac_dagster.steps.semantic_id_tables import TABLE as SID_TABLE
from taac_dagster.tracks import get_track

log = logging.getLogger(__name__)

ARRAYS_VERSION = 4  # 4: cand_released
# The warehouse tables the arrays are prepared from (the assets' deps: taac_dagster/lineage.py).
TABLES_READ = ("events", "feature_vocab", "items", "users", "sequences", "holdout", "candidates",
               "embedding_families", SID_TABLE, SID_INFO_TABLE)


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
    logger: logging.Logger | None = None,
    settings: TaacSettings | None = None,
) -> Arrays:
    """Arrays of ``warehouse`` in ``out_dir``; reused as they are when the source key matches.
    ``settings`` gives the read connection its DuckDB memory and threads."""
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
        meta["data_version"] = folder_digest(Path(tmp))
        (Path(tmp) / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    logger.info(f"prepared arrays in {out_dir} in {meta['seconds']:.1f}s (data version {meta['data_version']})")
    return load_arrays(out_dir)


def prepare_track_arrays(paths: TrackPaths, settings: TaacSettings, *, logger: logging.Logger | None = None) -> Arrays:
    """The track's arrays under ``<root>/<track>/checkpoints/arrays`` (built or reused)."""
    options = PrepareOptions(
        max_len=settings.max_history,
        # Families on auto (None): every family the warehouse selected, possibly none.
        families=None if settings.embedding_families is None else tuple(settings.embedding_families),
        val_users=settings.training.val_users,
    )
    return prepare_arrays(
        paths.warehouse, paths.checkpoints / "arrays", paths.track, options,
        codebooks_json=paths.codebooks / "codebooks.json", logger=logger or log, settings=settings,
    )


# --- Reading the warehouse ---------------------------------------------------------------------


def _scalar(con: duckdb.DuckDBPyConnection, sql: str) -> Any:
    return con.execute(sql).fetchall()[0][0]


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    return [row[0] for row in con.execute(f"SELECT column_name FROM (DESCRIBE {table})").fetchall()]


def _has_table(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [table]).fetchall()[0][0])


def read_row_space(con: duckdb.DuckDBPyConnection) -> RowSpace:
    """The warehouse's item row space: its largest item id, then its cold candidates."""
    max_item = int(_scalar(
        con,
        "SELECT greatest((SELECT coalesce(max(item_id), 0) FROM items), (SELECT coalesce(max(item_id), 0) FROM candidates))",
    ))
    extra = con.execute(
        "SELECT DISTINCT creative_id FROM candidates WHERE item_id IS NULL ORDER BY creative_id"
    ).fetchnumpy()["creative_id"].astype(np.int64)
    return RowSpace(max_item + 1, extra)


def _prepare(
    con: duckdb.DuckDBPyConnection,
    out: Path,
    track: str,
    options: PrepareOptions,
    codebooks_json: Path | None,
    logger: logging.Logger,
) -> dict[str, Any]:
    spec = get_track(track)
    n_actions = len(spec.allowed_actions)
    time_origin = int(_scalar(con, 'SELECT coalesce(min("timestamp"), 0) FROM events'))
    space = read_row_space(con)
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
        "user_sparse": list(USER_SPARSE_FEATURES),
        "user_multi": list(USER_ARRAY_FEATURES),
        "multi_len": options.multi_len,
        "options": asdict(options),
    }
    meta.update(_write_item_features(con, out, space, vocab))
    meta.update(_write_multimodal(con, out, space, options, logger))
    meta.update(_write_semantic_ids(con, out, space, options, codebooks_json, logger))
    meta.update(_write_users(con, out, vocab, options))
    holdout = _write_holdout(con, out, options.max_len, time_origin, spec.target_priority, options.chunk_users)
    validation = write_validation(out, holdout["previous_column"], options.val_users, options.val_seed)
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
    item_cols = [c[1:] for c in _columns(con, "items") if c.startswith("f") and c[1:] in ITEM_MODEL_FEATURES]
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
    save_array(out, "item_feats", item_feats)
    save_array(out, "item_creative", creative)
    return {"item_features": list(item_cols), "item_vocab": item_vocab}


def _write_multimodal(
    con: duckdb.DuckDBPyConnection, out: Path, space: RowSpace, options: PrepareOptions, logger: logging.Logger
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
        save_array(out, f"item_mm_{family}", table)
        mm_dims.append(int(dim))
        del table
    save_array(out, "item_mm_mask", mm_mask)
    return {"families": families, "mm_dims": mm_dims}


def _write_semantic_ids(
    con: duckdb.DuckDBPyConnection, out: Path, space: RowSpace, options: PrepareOptions,
    codebooks_json: Path | None, logger: logging.Logger,
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
    save_array(out, "item_sids", sids)
    return {
        "sid_levels": levels,
        "sid_vocab": [int(v) + 1 for v in sids.max(axis=0)],
        "codebooks": {k: info[k] for k in ("levels", "codebook_size", "family", "source") if k in info},
    }


def _semantic_id_info(con: duckdb.DuckDBPyConnection, codebooks_json: Path | None, logger: logging.Logger) -> dict[str, Any]:
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
    sparse_names = [c for c in USER_SPARSE_FEATURES if f"f{c}" in user_cols]
    multi_names = [c for c in USER_ARRAY_FEATURES if f"f{c}" in user_cols]
    cols = ", ".join(["user_id"] + [f"f{c}" for c in sparse_names + multi_names])
    users = con.sql(f"SELECT {cols} FROM users").to_arrow_table()
    user_ids = users.column("user_id").to_numpy().astype(np.int64)
    sparse_rows, multi_rows, user_vocab = encode_user_features(
        users, vocab, options.multi_len, sparse_features=USER_SPARSE_FEATURES, multi_features=USER_ARRAY_FEATURES
    )
    user_sparse = np.zeros((max_user + 1, len(USER_SPARSE_FEATURES)), np.int32)
    user_multi = np.zeros((max_user + 1, len(USER_ARRAY_FEATURES), options.multi_len), np.int32)
    user_sparse[user_ids], user_multi[user_ids] = sparse_rows, multi_rows
    save_array(out, "user_sparse", user_sparse)
    save_array(out, "user_multi", user_multi)
    return {"num_user_rows": max_user + 1, "user_vocab": user_vocab}


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
            times = pad_lists(lengths, relative_times(flat, time_origin), L, np.int32, left=True)
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
            times = pad_lists(lengths, relative_times(times_flat, time_origin), L, np.int32, left=True)
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
    save_array(out, "item_counts", counts.reshape(n_rows, n_actions))
    return {"num_sequences": n_seq, "num_events": events}


def _write_candidates(con: duckdb.DuckDBPyConnection, out: Path, space: RowSpace) -> dict[str, Any]:
    """The candidate pool, in retrieval-id order."""
    cand = con.execute(
        "SELECT coalesce(item_id, -1) AS item_id, creative_id, retrieval_id, is_cold, released FROM candidates "
        "ORDER BY retrieval_id"
    ).fetchnumpy()
    cand_rows = space.rows_of(cand["item_id"].astype(np.int64), cand["creative_id"].astype(np.int64))
    if (cand_rows < 0).any():
        raise ValueError(f"{int((cand_rows < 0).sum())} candidates have no item row")
    save_array(out, "cand_rows", cand_rows.astype(np.int32))
    save_array(out, "cand_creative", cand["creative_id"].astype(np.int64))
    save_array(out, "cand_retrieval", cand["retrieval_id"].astype(np.int64))
    save_array(out, "cand_cold", np.asarray(cand["is_cold"], bool))
    released = np.asarray(cand["released"], bool)
    save_array(out, "cand_released", released)
    return {"num_candidates": int(len(cand_rows)), "num_released": int(released.sum())}
