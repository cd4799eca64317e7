"""Semantic IDs of one track: the warehouse's items in, RQ-KMeans codebooks and the
``item_semantic_ids`` table out. The per-track glue around the plain code (``models.semantic_ids``,
``models.item_vectors``, ``models.item_semantic_ids``, ``models.collaborative``): it reads the
settings and the warehouse, chooses the vectors, publishes the codebooks folder atomically and
writes the table (``taac_dagster.steps.semantic_id_tables``).

Which vectors (setting ``source``): ``content`` quantizes a family's embeddings;
``collaborative`` quantizes vectors learned from the ``sequences`` table
(``models/collaborative.py``: SVD of the PPMI of item co-occurrence), for data with no family
or too little coverage; ``auto`` (the default) takes content when the family covers at least
``min_items`` items and collaborative otherwise, so a real dataset whatever its families
never stops here. The choice is recorded as ``source`` (``content:81`` or ``collaborative``)
with the content coverage in ``codebooks.json``. The fallback of items without a vector
(``models.item_semantic_ids``) is the same for both.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from models.collaborative import CollaborativeConfig, collaborative_vectors
from models.item_semantic_ids import ItemCodes, code_metrics, encode_items, item_topic_recovery
from models.item_vectors import ContentCoverage, FamilyReader, ItemVectors, MatrixReader
from models.semantic_ids import (
    CODEBOOKS_JSON,
    RQCodebooks,
    SemanticIdConfig,
    auto_codebook_size,
    fit_rq_kmeans,
    training_sample,
)
from taac_dagster.atomic import atomic_dir
from taac_dagster.errors import TaacError
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import SemanticIdSettings, TaacSettings
from taac_dagster.sources.synthetic import GROUND_TRUTH_DIR
from taac_dagster.steps.semantic_id_tables import TABLE, sequence_batches, write_item_semantic_ids
from taac_dagster.tracks import get_track
from taac_dagster.warehouse import connect_warehouse

log = logging.getLogger(__name__)

# The warehouse tables the Semantic IDs are built from (the asset's deps: taac_dagster/lineage.py).
TABLES_READ = ("items", "candidates", "sequences", "holdout", "embedding_families")
FALLBACK_FEATURE = "102"  # the advertiser: items without an embedding borrow its mean embedding


class SemanticIdInputError(TaacError):
    """The embeddings cannot support Semantic IDs: family missing, or too few items have it."""


@dataclass
class SemanticIdResult:
    source: str  # what was quantized: "content:<family>" or "collaborative"
    family: int | None  # the family quantized (None: collaborative vectors)
    dim: int
    codebooks: RQCodebooks
    codes: np.ndarray  # int32 [n, levels + 1] (last column: disambiguation)
    creative_ids: np.ndarray
    has_embedding: np.ndarray  # a vector of the source used (else the advertiser / unknown fallback)
    metrics: dict[str, Any]
    codebooks_dir: Path
    warehouse: Path
    seconds: dict[str, float]
    coverage: ContentCoverage

    def to_metadata(self) -> dict[str, Any]:
        return {
            **self.metrics,
            "source": self.source,
            "family": self.family,
            "dim": self.dim,
            "codebooks_dir": str(self.codebooks_dir),
            "warehouse": str(self.warehouse),
            "table": TABLE,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


def build_semantic_ids(paths: TrackPaths, settings: TaacSettings, *, logger: logging.Logger | None = None) -> SemanticIdResult:
    """Fit codebooks on the track's item vectors, code every item and candidate, write both.

    The vectors are the chosen content family's embeddings, or collaborative vectors learned
    from the ``sequences`` table (``models.collaborative``) when the source is collaborative, or
    auto and the family covers too few items (or there is none).
    """
    logger = logger or log
    seconds: dict[str, float] = {}
    vectors = choose_item_vectors(paths, settings, logger, seconds)
    cfg = _rq_config(settings.semantic_ids, vectors, logger)
    started = time.perf_counter()
    train = vectors.reader.read(training_sample(int(vectors.reader.has_embedding.sum()), cfg))  # fit's own subsample
    codebooks = fit_rq_kmeans(train, cfg, logger=logger, overwrite_input=True)
    del train
    seconds["fit"] = time.perf_counter() - started
    started = time.perf_counter()
    item_codes = encode_items(codebooks, vectors, logger)
    seconds["encode"] = time.perf_counter() - started
    metrics = code_metrics(codebooks, vectors, item_codes)
    logger.info(
        f"utilization {metrics['utilization']}, reconstruction error {metrics['reconstruction_error']}, "
        f"collisions {metrics['collision_rate_before']:.1%} -> 0 (max disambiguation {metrics['max_disambiguation']})"
    )
    truth = _synthetic_topics(paths)
    if truth is not None:
        metrics["topic_recovery"] = item_topic_recovery(truth, codebooks, vectors, item_codes, cfg.seed)
        logger.info(f"level-1 codes vs planted topics: {metrics['topic_recovery']}")
    started = time.perf_counter()
    _publish(paths, settings, codebooks, vectors, item_codes, metrics)
    seconds["write"] = time.perf_counter() - started
    logger.info(f"wrote {len(item_codes.rq_codes)} rows to {TABLE} and the codebooks to {paths.codebooks}")
    return SemanticIdResult(
        vectors.source, vectors.family, vectors.dim, codebooks, item_codes.codes, vectors.universe["creative_id"],
        vectors.reader.has_embedding, metrics, paths.codebooks, paths.warehouse, seconds, vectors.coverage,
    )


def choose_item_vectors(
    paths: TrackPaths, settings: TaacSettings, logger: logging.Logger, seconds: dict[str, float]
) -> ItemVectors:
    """The content family's embeddings when the source allows it and they cover enough items,
    else collaborative vectors from the training sequences (``settings.semantic_ids.source``)."""
    sid = settings.semantic_ids
    started = time.perf_counter()
    families, universe = _read_inputs(paths, settings)
    family_row = _choose_family(families, sid.family, settings.embedding_families, paths.track)
    creative_ids = universe["creative_id"]
    n = len(creative_ids)
    content = FamilyReader(Path(family_row[2]), creative_ids) if family_row is not None else None
    n_content = content.n_embedded if content is not None else 0
    k_content = sid.codebook_size or auto_codebook_size(n_content)
    coverage = ContentCoverage(
        family=int(family_row[0]) if family_row is not None else None,
        items=n,
        items_with_content=n_content,
        min_items=sid.min_items if sid.min_items is not None else max(k_content, math.ceil(0.02 * n)),
    )
    kind = choose_source(sid.source, coverage, paths.track)
    seconds["read"] = time.perf_counter() - started
    if kind == "content":
        assert content is not None and family_row is not None
        return ItemVectors(content, f"content:{coverage.family}", coverage.family, int(family_row[1]), coverage, universe)
    if sid.source == "auto":
        logger.warning(
            f"content coverage too low for Semantic IDs ({coverage.to_metadata()}): "
            "using collaborative vectors from the training sequences"
        )
    started = time.perf_counter()
    learned = collaborative_vectors(
        partial(sequence_batches, paths.warehouse, settings, get_track(paths.track).target_priority),
        CollaborativeConfig(
            dim=sid.collaborative_dim, window=sid.collaborative_window, max_items=sid.collaborative_max_items,
            seed=sid.seed,
        ),
    )
    seconds["collaborative"] = time.perf_counter() - started
    if len(learned.item_ids) == 0:
        raise SemanticIdInputError(
            f"no item of track {paths.track} has a collaborative vector (no two items share a training "
            f"sequence), and content vectors were not used ({coverage.to_metadata()}): Semantic IDs need "
            "one or the other"
        )
    reader = MatrixReader(learned.item_ids, learned.vectors, universe["item_id"])
    return ItemVectors(reader, "collaborative", None, learned.vectors.shape[1], coverage, universe, learned.stats)


def _read_inputs(paths: TrackPaths, settings: TaacSettings) -> tuple[list[tuple[Any, ...]], dict[str, np.ndarray]]:
    """The families the warehouse holds, and every item and candidate to code (the universe)."""
    if not paths.warehouse.is_file():
        raise SemanticIdInputError(
            f"{paths.warehouse} is missing: materialize the warehouse tables of track {paths.track} first"
        )
    con = connect_warehouse(paths.warehouse, settings, read_only=True)
    try:
        tables = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if "embedding_families" not in tables:
            raise SemanticIdInputError(
                f"{paths.warehouse} has no embedding_families table: re-materialize the warehouse of track {paths.track}"
            )
        families = con.execute("SELECT family, dim, path, indexed_items, item_coverage FROM embedding_families").fetchall()
        feature = f"f{FALLBACK_FEATURE}"
        item_cols = {r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'items'").fetchall()}
        cand_cols = {
            r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'candidates'").fetchall()
        }
        item_feature = f"i.{feature}" if feature in item_cols else "NULL"
        cand_feature = f"c.{feature}" if feature in cand_cols else "NULL"
        rows = con.execute(
            f"""
            WITH i AS (SELECT * FROM items WHERE creative_id IS NOT NULL),
            universe AS (
                SELECT i.creative_id, i.item_id, {item_feature} AS group_key, true AS in_items FROM i
                UNION ALL
                SELECT c.creative_id, c.item_id, {cand_feature} AS group_key, false AS in_items
                FROM candidates c WHERE c.creative_id IS NOT NULL
            )
            SELECT creative_id,
                   coalesce(min(item_id) FILTER (WHERE in_items), min(item_id)) AS item_id,
                   coalesce(min(group_key) FILTER (WHERE in_items), min(group_key)) AS group_key
            FROM universe GROUP BY creative_id ORDER BY creative_id
            """
        ).fetchall()
        dropped = con.execute("SELECT count(*) FROM items WHERE creative_id IS NULL").fetchall()[0][0]
    finally:
        con.close()
    universe = {
        "creative_id": np.array([r[0] for r in rows], np.int64),
        "item_id": np.array([-1 if r[1] is None else r[1] for r in rows], np.int64),
        "group_key": np.array([0 if r[2] is None else r[2] for r in rows], np.int64),
        "items_without_creative_id": np.array([dropped]),
    }
    return families, universe


def _choose_family(
    families: list[tuple[Any, ...]], wanted: int | None, configured: list[int] | None, track: str
) -> tuple[Any, ...] | None:
    """The warehouse row of the family to quantize: ``wanted``, else the first configured family,
    else (families on auto) the lowest family the warehouse holds; None when it holds none and
    none was asked for. A family asked for but not built is an error."""
    built = {int(f[0]): f for f in families}
    if wanted is not None:
        family = wanted
    elif configured:
        family = configured[0]
    else:
        return built[min(built)] if built else None
    if family not in built:
        have = ", ".join(str(f) for f in sorted(built)) or "none"
        raise SemanticIdInputError(
            f"embedding family {family} is not in the warehouse of track {track} (families built: {have}). "
            f"Either set TAAC_SEMANTIC_IDS__FAMILY to one of them, or add {family} to TAAC_EMBEDDING_FAMILIES "
            "and re-materialize raw_dataset and the warehouse tables."
        )
    return built[family]


def choose_source(setting: str, coverage: ContentCoverage, track: str) -> str:
    """"content" or "collaborative" for the ``source`` setting (auto | content | collaborative):
    auto takes content when its coverage suffices; content without it is an error."""
    if setting == "collaborative":
        return "collaborative"
    if coverage.sufficient:
        return "content"
    if setting == "auto":
        return "collaborative"
    if coverage.family is None:
        raise SemanticIdInputError(
            f"the warehouse of track {track} holds no embedding family, and TAAC_SEMANTIC_IDS__SOURCE is "
            "'content'. Set it to auto or collaborative (codes from the training sequences), or add a "
            "family (TAAC_EMBEDDING_FAMILIES) and re-materialize raw_dataset and the warehouse tables."
        )
    raise SemanticIdInputError(
        f"embedding family {coverage.family} covers only {coverage.items_with_content} of the {coverage.items} "
        f"items and candidates of track {track}; Semantic IDs need at least {coverage.min_items}. Choose a "
        "family with more coverage (TAAC_SEMANTIC_IDS__FAMILY), lower TAAC_SEMANTIC_IDS__MIN_ITEMS / "
        "TAAC_SEMANTIC_IDS__CODEBOOK_SIZE, set TAAC_SEMANTIC_IDS__SOURCE=auto to fall back to collaborative "
        "vectors, or check the family's source files."
    )


def _rq_config(sid: SemanticIdSettings, vectors: ItemVectors, logger: logging.Logger) -> SemanticIdConfig:
    """The RQ-KMeans config of the settings, K chosen from the items with a vector when unset."""
    n_embedded = int(vectors.reader.has_embedding.sum())
    k = sid.codebook_size or auto_codebook_size(n_embedded)
    logger.info(
        f"source {vectors.source} ({vectors.dim}-d): {n_embedded} of {len(vectors.universe['creative_id'])} items "
        f"have a vector; {sid.levels} levels x K={k}, whiten={sid.whiten}"
    )
    return SemanticIdConfig(
        levels=sid.levels, codebook_size=k, whiten=sid.whiten, whiten_dim=sid.whiten_dim, niter=sid.niter,
        seed=sid.seed, max_train_points=sid.max_train_points, normalize=sid.normalize,
    )


def _synthetic_topics(paths: TrackPaths) -> tuple[np.ndarray, np.ndarray] | None:
    """(creative ids, topics) of the generator's ground truth, when the source is synthetic."""
    if not paths.raw_manifest.is_file():
        return None
    manifest = json.loads(paths.raw_manifest.read_text())
    truth = Path(manifest.get("root", "")) / GROUND_TRUTH_DIR / "items.parquet"
    if manifest.get("source") != "synthetic" or not truth.is_file():
        return None
    table = pq.read_table(truth, columns=["creative_id", "topic"])
    ids = table.column("creative_id").to_numpy().astype(np.int64)
    order = np.argsort(ids)
    return ids[order], table.column("topic").to_numpy()[order]


def _publish(
    paths: TrackPaths, settings: TaacSettings, codebooks: RQCodebooks, vectors: ItemVectors, item_codes: ItemCodes,
    metrics: dict[str, Any],
) -> None:
    """The codebooks folder (atomically), then the item_semantic_ids table with the codebooks'
    description (one transaction, the commit point). Both carry one build id: a crash between
    the two leaves the table and its description of the previous build, which is what training
    reads (``models.data``); the codebooks folder alone may then be newer."""
    metadata = {
        "build_id": uuid.uuid4().hex[:12],
        "source": vectors.source,
        "family": vectors.family,
        "family_dim": vectors.dim if vectors.family is not None else None,
        "track": paths.track,
        "content_coverage": vectors.coverage.to_metadata(),
        "metrics": metrics,
    }
    with atomic_dir(paths.codebooks) as tmp:
        codebooks.save(tmp, metadata)
    write_item_semantic_ids(
        paths.warehouse, settings, vectors.universe["creative_id"], vectors.universe["item_id"], item_codes.codes,
        vectors.reader.has_embedding, json.loads((paths.codebooks / CODEBOOKS_JSON).read_text()),
    )
