"""Build one track's DuckDB warehouse from a raw dataset in either real format.

Write, audit, publish: the database and its embedding files are built under temporary names
beside their targets (``stage_warehouse``), the blocking data-quality checks run on that staged
copy, and only a copy that passes them is renamed into place (``publish_warehouse``). A copy
that fails is moved to ``<root>/<track>/rejected/`` for inspection (``set_aside_warehouse``),
and the warehouse the chain reads stays the last one that passed. ``build_checked_warehouse``
does all three; ``build_warehouse`` stages and publishes without checks (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from taac_dagster.atomic import (
    keep_newest,
    remove_entry,
    remove_stale_temps,
    replace_durably,
    temp_owner_gone,
    temp_sibling,
)
from taac_dagster.db import connect as connect_duckdb
from taac_dagster.errors import DataFormatError, TaacError
from taac_dagster.formats import HUB_FORMAT, JSONL_FORMAT
from taac_dagster.paths import TrackPaths
from taac_dagster.quality import ERROR, CheckOutcome, run_checks
from taac_dagster.readers.detect import detect_format
from taac_dagster.readers.embeddings import (
    families_text,
    find_embedding_source,
    select_embedding_families,
    write_family_embeddings,
)
from taac_dagster.readers.hub_parquet import diagnose_seq, locate_event, stage_hub_dataset
from taac_dagster.readers.json_lines import short
from taac_dagster.readers.jsonl import stage_jsonl_dataset
from taac_dagster.readers.staging import drop_staging
from taac_dagster.settings import TaacSettings
from taac_dagster.sql import load_sql, read_path, sql_read_path
from taac_dagster.tracks import get_track
from taac_dagster.warehouse_info import write_warehouse_info

log = logging.getLogger(__name__)

SPILL_DIR = ".duckdb_spill"  # DuckDB's out-of-core scratch space, removed after each build
REJECTED_DIR = "rejected"  # staged warehouses that failed a blocking check, kept for inspection
BUILD_PREFIX = "build-"  # embeddings/build-<id>: one warehouse build's embedding files

# Built in this order; each reads the staging tables and the tables before it.
WAREHOUSE_TABLES = ("feature_vocab", "events", "items", "users", "holdout", "sequences", "candidates")


@dataclass
class WarehouseSummary:
    path: Path
    dataset_format: str
    row_counts: dict[str, int]
    embeddings: dict[int, dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)
    missing_action_types: int = 0
    families_requested: list[int] | None = None  # the setting; None: auto (every family found)
    embeddings_folder: Path | None = None  # where the published database reads its embedding files

    @property
    def families(self) -> list[int]:
        """The embedding families selected and written (possibly none)."""
        return sorted(self.embeddings)

    def to_metadata(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "dataset_format": self.dataset_format,
            **{f"rows_{name}": count for name, count in self.row_counts.items()},
            "missing_action_types": self.missing_action_types,
            "embedding_families": {str(f): info for f, info in self.embeddings.items()},
            "embedding_families_requested": families_text(self.families_requested),
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


@dataclass
class StagedWarehouse:
    """A built warehouse not yet published: its database sits under a temporary name beside
    its target and its embeddings in a temporary folder under ``embeddings/``; ``build_id``
    names the folder they are published in (``embeddings/build-<id>``)."""

    database: Path
    embeddings: Path
    summary: WarehouseSummary
    build_id: str = ""
    published: bool = False


class BlockingChecksFailed(TaacError):
    """The staged warehouse failed a blocking check: it was set aside, nothing was published."""

    def __init__(self, outcomes: list[CheckOutcome], rejected: Path, published: Path) -> None:
        self.outcomes = outcomes
        self.rejected = rejected
        failed = [o for o in outcomes if not o.passed and o.severity == ERROR]
        self.failed = failed
        lines = "\n".join(f"- {o.name}: {o.description}" for o in failed)
        kept = f"{published} was left as it was" if published.exists() else f"nothing was published at {published}"
        super().__init__(
            f"{len(failed)} blocking data-quality check(s) failed, so the new warehouse was not published ({kept}); "
            f"the rejected build is kept for inspection at {rejected}:\n{lines}"
        )


def connect_warehouse(path: Path, settings: TaacSettings, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A connection to a warehouse file with the settings' memory and threads; a writer spills
    to ``.duckdb_spill`` beside it."""
    spill = None if read_only else path.parent / SPILL_DIR
    return connect_duckdb(path, settings, read_only=read_only, spill_dir=spill)


def table_params(track: str, settings: TaacSettings) -> dict[str, Any]:
    spec = get_track(track)
    priority = ", ".join(
        f"max(position) FILTER (WHERE action_type = {action})" for action in spec.target_priority
    )
    return {
        "max_history": int(settings.max_history),
        "target_position": f"coalesce({priority}, NULL)",
        "target_actions": "(" + ", ".join(str(a) for a in spec.target_priority) + ")",
    }


def stage_warehouse(
    source_root: Path, paths: TrackPaths, settings: TaacSettings, *, logger: logging.Logger | None = None
) -> StagedWarehouse:
    """Stage ``source_root`` (format detected), run ``sql/``, write the embeddings, all under
    temporary names; nothing the chain reads changes. A failure removes what was written."""
    logger = logger or log
    dataset_format = detect_format(source_root)
    params = table_params(paths.track, settings)
    paths.root.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temps(paths.root)
    if removed:
        logger.warning(f"removed {removed} leftovers of interrupted builds in {paths.root}")
    collect_embedding_builds(paths, settings, logger=logger)
    build_id = uuid.uuid4().hex[:12]
    database = temp_sibling(paths.warehouse, paths.warehouse.suffix)
    embeddings = temp_sibling(paths.embeddings / f"{BUILD_PREFIX}{build_id}")
    embeddings.mkdir(parents=True)
    try:
        summary = _build(source_root, dataset_format, paths, settings, params, database, embeddings, logger)
    except BaseException:
        discard_staged(StagedWarehouse(database, embeddings, None))  # type: ignore[arg-type]
        raise
    finally:
        shutil.rmtree(paths.root / SPILL_DIR, ignore_errors=True)
    return StagedWarehouse(database, embeddings, summary, build_id)


def discard_staged(staged: StagedWarehouse) -> None:
    if staged.published:
        return
    Path(str(staged.database) + ".wal").unlink(missing_ok=True)
    staged.database.unlink(missing_ok=True)
    shutil.rmtree(staged.embeddings, ignore_errors=True)


def _point_embeddings_at(database: Path, settings: TaacSettings, folder: Path) -> None:
    """Record ``folder`` as the place of the database's embedding files."""
    con = connect_duckdb(database, settings)
    try:
        con.execute(
            "UPDATE embedding_families SET path = ? || '/' || parse_filename(path)", [str(folder)]
        )
        con.execute("CHECKPOINT")
    finally:
        con.close()


def embedding_paths(database: Path, settings: TaacSettings) -> dict[int, Path]:
    """family -> the embedding file ``database`` reads (empty without families)."""
    con = connect_duckdb(database, settings, read_only=True)
    try:
        rows = con.execute("SELECT family, path FROM embedding_families ORDER BY family").fetchall()
    finally:
        con.close()
    return {int(family): Path(path) for family, path in rows}


def collect_embedding_builds(paths: TrackPaths, settings: TaacSettings, *, logger: logging.Logger | None = None) -> int:
    """Remove what under ``embeddings/`` the published database does not read: builds a
    crashed or superseded publish left, loose files of the layout before builds, temporaries
    whose writer is gone. Only the database decides what is kept, so the folder it reads is
    never removed, whatever state a crash left. Returns how many entries were removed."""
    folder = paths.embeddings
    if not folder.is_dir():
        return 0
    files = embedding_paths(paths.warehouse, settings).values() if paths.warehouse.is_file() else []
    kept = {path.parent.resolve() for path in files}
    loose_layout = folder.resolve() in kept  # a database from before builds reads emb_*.parquet here
    removed = 0
    for entry in folder.iterdir():
        if entry.resolve() in kept or (entry.is_file() and loose_layout):
            continue
        if entry.name.startswith(".") and not temp_owner_gone(entry):
            continue  # a build being written right now
        remove_entry(entry)
        removed += 1
    if removed:
        (logger or log).info(f"removed {removed} embedding builds or leftovers in {folder} that the warehouse does not read")
    return removed


def publish_warehouse(staged: StagedWarehouse, paths: TrackPaths, settings: TaacSettings) -> WarehouseSummary:
    """Publish a staged warehouse with one commit point: the rename of the database.

    The embeddings go first to ``embeddings/build-<id>``, a folder no published database reads
    yet, and the staged database already names that folder; renaming the database over the
    published one switches both at once. A crash before that rename leaves the old database
    with its own embeddings (the unread build is collected by the next build); a crash after
    it leaves the new pair (the old build is collected). Old builds are removed only after the
    switch, and only those the published database does not read."""
    target = paths.embeddings / f"{BUILD_PREFIX}{staged.build_id}"
    _point_embeddings_at(staged.database, settings, target)
    replace_durably(staged.embeddings, target)
    staged.embeddings = target
    # A write-ahead log left by a crashed writer of the old file must not replay onto the new one.
    Path(str(paths.warehouse) + ".wal").unlink(missing_ok=True)
    replace_durably(staged.database, paths.warehouse)  # the commit point
    staged.published = True  # from here on nothing of the new build may be discarded
    try:
        collect_embedding_builds(paths, settings)
    except OSError as error:  # the next build collects them
        log.warning(f"old embedding builds in {paths.embeddings} were not removed: {error}")
    staged.summary.path, staged.summary.embeddings_folder = paths.warehouse, target
    return staged.summary


def set_aside_warehouse(staged: StagedWarehouse, paths: TrackPaths, settings: TaacSettings) -> Path:
    """Move a staged warehouse that failed its checks to ``<root>/rejected/warehouse-<time>.duckdb``
    (its embeddings beside it), keeping the ``rejected_keep`` newest; returns the database's new path."""
    folder = paths.root / REJECTED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
    database = folder / f"warehouse-{stamp}.duckdb"
    embeddings = folder / f"embeddings-{stamp}"
    _point_embeddings_at(staged.database, settings, embeddings)
    os.replace(staged.embeddings, embeddings)
    os.replace(staged.database, database)
    staged.summary.path = database
    keep_newest(folder, settings.rejected_keep)
    return database


def build_warehouse(
    source_root: Path, paths: TrackPaths, settings: TaacSettings, *, logger: logging.Logger | None = None
) -> WarehouseSummary:
    """Stage and publish without running the data-quality checks (tests, benchmarks); the
    pipeline publishes through ``build_checked_warehouse``."""
    staged = stage_warehouse(source_root, paths, settings, logger=logger)
    try:
        return publish_warehouse(staged, paths, settings)
    except BaseException:
        discard_staged(staged)
        raise


def build_checked_warehouse(
    source_root: Path, paths: TrackPaths, settings: TaacSettings, *, logger: logging.Logger | None = None,
    verify_source: Callable[[], None] | None = None,
) -> tuple[WarehouseSummary, list[CheckOutcome]]:
    """Write, audit, publish: stage the warehouse, run every data-quality check on the staged
    copy, and publish it only when every blocking (ERROR) check passes. Returns the summary and
    the check outcomes; raises ``BlockingChecksFailed`` (the copy set aside) otherwise.
    ``verify_source`` (raising when the source changed) runs before staging and again before
    the publish, so a warehouse is never published from files that changed under the build."""
    logger = logger or log
    verify_source = verify_source or (lambda: None)
    verify_source()
    staged = stage_warehouse(source_root, paths, settings, logger=logger)
    try:
        logger.info(f"running data-quality checks on the staged warehouse {staged.database}")
        outcomes = run_checks(
            staged.database, paths.track, max_history=settings.max_history,
            sample_users=settings.check_sample_users, settings=settings,
        )
        verify_source()
    except BaseException:
        discard_staged(staged)
        raise
    if any(not o.passed and o.severity == ERROR for o in outcomes):
        rejected = set_aside_warehouse(staged, paths, settings)
        raise BlockingChecksFailed(outcomes, rejected, paths.warehouse)
    try:
        return publish_warehouse(staged, paths, settings), outcomes
    except BaseException:
        discard_staged(staged)
        raise


def _build(
    source_root: Path,
    dataset_format: str,
    paths: TrackPaths,
    settings: TaacSettings,
    params: dict[str, Any],
    database: Path,
    embeddings_dir: Path,
    logger: logging.Logger,
) -> WarehouseSummary:
    seconds: dict[str, float] = {}
    actions = get_track(paths.track).allowed_actions
    con = connect_warehouse(database, settings)
    try:
        started = time.perf_counter()
        logger.info(f"staging {dataset_format} dataset from {source_root}")
        with _unreadable_data(source_root, "staging the dataset"):
            if dataset_format == HUB_FORMAT:
                stage_hub_dataset(con, source_root)
            elif dataset_format == JSONL_FORMAT:
                stage_jsonl_dataset(con, source_root, actions=actions)
        seconds["stage"] = time.perf_counter() - started
        for name in WAREHOUSE_TABLES:
            started = time.perf_counter()
            with _unreadable_data(source_root, f"building the table {name}"):
                con.execute(load_sql(name, **params))
            seconds[name] = time.perf_counter() - started
            logger.info(f"built table {name} in {seconds[name]:.1f}s")
            if name == "events":
                validate_events(con, source_root, dataset_format, actions)
        with _unreadable_data(source_root, "writing the embeddings"):
            embeddings = _write_embeddings(con, source_root, dataset_format, settings, embeddings_dir, logger)
        missing = con.execute("SELECT count(*) FROM events WHERE action_type_missing").fetchall()[0][0]
        write_warehouse_info(con, paths.track, dataset_format, source_root, sorted(embeddings), settings.embedding_families)
        drop_staging(con)
        counts = {
            name: con.execute(f"SELECT count(*) FROM {name}").fetchall()[0][0] for name in WAREHOUSE_TABLES
        }
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return WarehouseSummary(
        database, dataset_format, counts, embeddings, seconds, int(missing), settings.embedding_families
    )


_FILE_IN_MESSAGE = re.compile(r'file "([^"]+)"')


@contextlib.contextmanager
def _unreadable_data(source_root: Path, step: str) -> Iterator[None]:
    """Turn a DuckDB error while reading the dataset (a corrupt page, bytes it cannot decode)
    into a DataFormatError naming the file DuckDB names, or the dataset folder. Running out of
    memory or being interrupted is not bad data and passes through."""
    try:
        yield
    except (duckdb.OutOfMemoryException, duckdb.InterruptException):
        raise
    except duckdb.Error as exc:
        named = _FILE_IN_MESSAGE.search(str(exc))
        raise DataFormatError(
            named.group(1) if named else source_root, f"data DuckDB can read ({step})", short(exc)
        ) from None


def validate_events(
    con: duckdb.DuckDBPyConnection, source_root: Path, dataset_format: str, actions: tuple[int, ...]
) -> None:
    """Every event's ids, action type and timestamp in the track's domain, checked over the whole
    ``events`` table in one pass; the first offender is named with its file and row or line."""
    allowed = ", ".join(str(a) for a in actions)
    rules = (
        ("user_id", "user_id IS NULL OR user_id < 1", "a user re-id from 1"),
        ("item_id", "item_id IS NULL OR item_id < 1", "an item re-id from 1"),
        ("action_type", f"action_type IS NULL OR action_type NOT IN ({allowed})", f"null or one of {allowed}"),
        ("timestamp", '"timestamp" IS NULL OR "timestamp" < 0', "integer Unix seconds (>= 0)"),
    )
    problem = " ".join(f"WHEN {condition} THEN {code}" for code, (_, condition, _) in enumerate(rules))
    rows = con.execute(
        f"""SELECT user_id, position, code FROM (
                SELECT user_id, position, CASE {problem} END AS code FROM events)
            WHERE code IS NOT NULL ORDER BY user_id NULLS FIRST, position LIMIT 1"""
    ).fetchall()
    if not rows:
        return
    user_id, position, code = rows[0]
    name, _, expected = rules[int(code)]
    if dataset_format == HUB_FORMAT:
        diagnose_seq(con, source_root / "seq")  # null ids and timestamps, by file and row
        where = locate_event(con, source_root / "seq", int(user_id), int(position)) if user_id is not None else None
        if where is not None:
            filename, row = where
            event_field = "action_type" if name == "action_type" else name
            value = con.execute(
                f"""SELECT CAST(seq[?].{'"timestamp"' if event_field == 'timestamp' else event_field} AS VARCHAR)
                    FROM read_parquet({sql_read_path(filename)}, file_row_number=true) WHERE file_row_number = ?""",
                [int(position) + 1, row],
            ).fetchall()
            found = value[0][0] if value and name != "user_id" else str(user_id)
            field_name = "user_id" if name == "user_id" else f"seq[{position}].{event_field}"
            raise DataFormatError(filename, expected, "null" if found is None else found, row=row, field=field_name)
    raise DataFormatError(
        source_root, f"events whose {name} is {expected}", f"user {user_id}, event {position} breaks it", field=name
    )


def _write_embeddings(
    con: duckdb.DuckDBPyConnection,
    source_root: Path,
    dataset_format: str,
    settings: TaacSettings,
    embeddings_dir: Path,
    logger: logging.Logger,
) -> dict[int, dict[str, Any]]:
    con.execute(
        """CREATE OR REPLACE TABLE embedding_families (
               family INTEGER, dim INTEGER, path VARCHAR, rows BIGINT, indexed_items BIGINT,
               duplicate_ids BIGINT, item_coverage DOUBLE)"""
    )
    n_items = con.execute("SELECT count(*) FROM items").fetchall()[0][0]
    result: dict[int, dict[str, Any]] = {}
    families = select_embedding_families(source_root, dataset_format, settings.embedding_families)
    if not families:
        logger.info("no multi-modal embedding family selected: ids, features and actions only")
    for family in families:
        started = time.perf_counter()
        source = find_embedding_source(source_root, dataset_format, family)
        out = embeddings_dir / f"emb_{family}.parquet"
        counts = write_family_embeddings(con, source, out)
        covered = con.execute(
            "SELECT count(*) FROM items WHERE item_id IN (SELECT item_id FROM read_parquet(?))", [read_path(out)]
        ).fetchall()[0][0]
        coverage = covered / n_items if n_items else 0.0
        con.execute(
            "INSERT INTO embedding_families VALUES (?, ?, ?, ?, ?, ?, ?)",
            [family, source.dim, str(out), counts["rows"], counts["indexed_items"], counts["duplicate_ids"], coverage],
        )
        result[family] = {"dim": source.dim, **counts, "item_coverage": round(coverage, 4)}
        logger.info(
            f"family {family}: {counts['rows']} embeddings of dim {source.dim}, "
            f"item coverage {coverage:.1%} ({time.perf_counter() - started:.1f}s)"
        )
    return result
