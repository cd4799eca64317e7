"""Build one track's DuckDB warehouse from a raw dataset in either real format."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

import shutil

from taac_dagster.atomic import atomic_dir, atomic_file, remove_stale_temps
from taac_dagster.errors import DataFormatError
from taac_dagster.formats import HUB_FORMAT, JSONL_FORMAT
from taac_dagster.paths import TrackPaths
from taac_dagster.readers.detect import detect_format
from taac_dagster.readers.embeddings import (
    families_text,
    find_embedding_source,
    select_embedding_families,
    write_family_embeddings,
)
from taac_dagster.readers.hub_parquet import diagnose_seq, stage_hub_dataset
from taac_dagster.readers.jsonl import diagnose_seq_jsonl, stage_jsonl_dataset
from taac_dagster.readers.staging import drop_staging
from taac_dagster.settings import TaacSettings
from taac_dagster.sql import load_sql
from taac_dagster.tracks import get_track

log = logging.getLogger(__name__)

SPILL_DIR = ".duckdb_spill"  # DuckDB's out-of-core scratch space, removed after each build

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


def connect(path: Path, settings: TaacSettings, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(path), read_only=read_only)
    con.execute(f"SET memory_limit = '{settings.duckdb_memory_limit}'")
    if settings.duckdb_threads:
        con.execute(f"SET threads = {int(settings.duckdb_threads)}")
    if not read_only:
        spill = path.parent / SPILL_DIR
        spill.mkdir(parents=True, exist_ok=True)
        con.execute(f"SET temp_directory = '{spill}'")
        con.execute("SET preserve_insertion_order = false")
    return con


def table_params(track: str, settings: TaacSettings) -> dict[str, Any]:
    spec = get_track(track)
    priority = ", ".join(
        f"max(position) FILTER (WHERE action_type = {action})" for action in spec.target_priority
    )
    return {
        "max_history": settings.max_history,
        "target_position": f"coalesce({priority}, NULL)",
        "target_actions": "(" + ", ".join(str(a) for a in spec.target_priority) + ")",
    }


def build_warehouse(
    source_root: Path, paths: TrackPaths, settings: TaacSettings, *, logger: Any = None
) -> WarehouseSummary:
    """Stage ``source_root`` (format detected), run ``sql/``, write embeddings; all atomically."""
    logger = logger or log
    dataset_format = detect_format(source_root)
    params = table_params(paths.track, settings)
    paths.root.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temps(paths.root)
    if removed:
        logger.warning(f"removed {removed} leftovers of interrupted builds in {paths.root}")
    try:
        return _build(source_root, dataset_format, paths, settings, params, logger)
    finally:
        shutil.rmtree(paths.root / SPILL_DIR, ignore_errors=True)


def _build(
    source_root: Path,
    dataset_format: str,
    paths: TrackPaths,
    settings: TaacSettings,
    params: dict[str, Any],
    logger: Any,
) -> WarehouseSummary:
    seconds: dict[str, float] = {}
    with atomic_file(paths.warehouse) as tmp_db, atomic_dir(paths.embeddings) as tmp_emb:
        con = connect(tmp_db, settings)
        try:
            started = time.perf_counter()
            logger.info(f"staging {dataset_format} dataset from {source_root}")
            if dataset_format == HUB_FORMAT:
                stage_hub_dataset(con, source_root)
            elif dataset_format == JSONL_FORMAT:
                stage_jsonl_dataset(con, source_root)
            seconds["stage"] = time.perf_counter() - started
            for name in WAREHOUSE_TABLES:
                started = time.perf_counter()
                con.execute(load_sql(name, **params))
                seconds[name] = time.perf_counter() - started
                logger.info(f"built table {name} in {seconds[name]:.1f}s")
                if name == "events":
                    _validate_events(con, source_root, dataset_format)
            embeddings = _write_embeddings(con, source_root, dataset_format, settings, paths, tmp_emb, logger)
            missing = con.execute("SELECT count(*) FROM events WHERE action_type_missing").fetchall()[0][0]
            _write_info(con, paths.track, dataset_format, source_root, sorted(embeddings), settings.embedding_families)
            drop_staging(con)
            counts = {
                name: con.execute(f"SELECT count(*) FROM {name}").fetchall()[0][0] for name in WAREHOUSE_TABLES
            }
            con.execute("CHECKPOINT")
        finally:
            con.close()
        # A write-ahead log left by a crashed writer of the old file must not replay onto the new one.
        Path(str(paths.warehouse) + ".wal").unlink(missing_ok=True)
    return WarehouseSummary(
        paths.warehouse, dataset_format, counts, embeddings, seconds, int(missing), settings.embedding_families
    )


def _validate_events(con: duckdb.DuckDBPyConnection, source_root: Path, dataset_format: str) -> None:
    nulls = con.execute(
        'SELECT count(*) FROM events WHERE user_id IS NULL OR item_id IS NULL OR "timestamp" IS NULL'
    ).fetchall()[0][0]
    if nulls:
        if dataset_format == HUB_FORMAT:
            diagnose_seq(con, source_root / "seq")
        else:
            diagnose_seq_jsonl(source_root / "seq.jsonl")
        raise DataFormatError(source_root, "events with non-null user, item and timestamp", f"{nulls} events with nulls")


def _write_embeddings(
    con: duckdb.DuckDBPyConnection,
    source_root: Path,
    dataset_format: str,
    settings: TaacSettings,
    paths: TrackPaths,
    tmp_dir: Path,
    logger: Any,
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
        final_path = paths.embedding_file(family)
        counts = write_family_embeddings(con, source, tmp_dir / final_path.name)
        covered = con.execute(
            f"""SELECT count(*) FROM items WHERE item_id IN (
                    SELECT item_id FROM read_parquet('{tmp_dir / final_path.name}'))"""
        ).fetchall()[0][0]
        coverage = covered / n_items if n_items else 0.0
        con.execute(
            "INSERT INTO embedding_families VALUES (?, ?, ?, ?, ?, ?, ?)",
            [family, source.dim, str(final_path), counts["rows"], counts["indexed_items"], counts["duplicate_ids"], coverage],
        )
        result[family] = {"dim": source.dim, **counts, "item_coverage": round(coverage, 4)}
        logger.info(
            f"family {family}: {counts['rows']} embeddings of dim {source.dim}, "
            f"item coverage {coverage:.1%} ({time.perf_counter() - started:.1f}s)"
        )
    return result


def _write_info(
    con: duckdb.DuckDBPyConnection,
    track: str,
    dataset_format: str,
    source_root: Path,
    families: list[int],
    requested: list[int] | None,
) -> None:
    con.execute("CREATE OR REPLACE TABLE warehouse_info (key VARCHAR, value VARCHAR)")
    con.executemany(
        "INSERT INTO warehouse_info VALUES (?, ?)",
        [
            ["track", track],
            ["dataset_format", dataset_format],
            ["source_root", str(source_root)],
            ["embedding_families", families_text(families)],
            ["embedding_families_requested", families_text(requested)],
            ["built_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())],
            ["pid", str(os.getpid())],
        ],
    )
