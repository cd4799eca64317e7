"""RQ-KMeans Semantic IDs: the plain code on planted data, bad input, and the asset."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
from dagster import AssetKey, DagsterInstance, materialize

from assets.raw import raw_dataset
from assets.semantic_ids import COVERAGE_CHECK, semantic_id_codebooks
from assets.warehouse import warehouse_tables
from models.item_semantic_ids import GroupMeans
from models.item_vectors import FamilyReader
from models.semantic_id_collisions import collision_rate, resolve_collisions
from models.semantic_id_quality import nmi, purity, reconstruction_error, utilization
from models.semantic_ids import (
    RQCodebooks,
    SemanticIdConfig,
    auto_codebook_size,
    decode,
    encode,
    encode_with_errors,
    fit_rq_kmeans,
)
from taac_dagster.paths import TrackPaths
from taac_dagster.resources import TaacConfig
from taac_dagster.settings import load_settings
from taac_dagster.steps.semantic_ids import SemanticIdInputError, build_semantic_ids
from taac_dagster.warehouse import build_warehouse


def planted(n_per: int = 120, topics: int = 12, dim: int = 24, noise: float = 0.25, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(topics, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = np.repeat(np.arange(topics), n_per)
    x = centers[labels] + noise * rng.normal(size=(len(labels), dim)).astype(np.float32) / np.sqrt(dim)
    return x.astype(np.float32), labels


def test_level_one_recovers_planted_clusters():
    x, labels = planted()
    # K above the number of topics (as in practice: 256 codes, far fewer true groups).
    books = fit_rq_kmeans(x, SemanticIdConfig(levels=2, codebook_size=24, seed=0))
    codes = encode(books, x)
    assert codes.shape == (len(x), 2) and codes.dtype == np.int32
    assert purity(codes[:, 0], labels) > 0.95
    assert nmi(codes[:, 0], labels) > 0.85
    # Chance level: the same codes shuffled across items.
    shuffled = np.random.default_rng(0).permutation(codes[:, 0])
    assert nmi(shuffled, labels) < 0.1
    assert utilization(codes, 24)[0] > 0.9


def test_metric_helpers_on_known_values():
    a = np.array([0, 0, 1, 1])
    assert nmi(a, np.array([5, 5, 7, 7])) == pytest.approx(1.0)
    assert nmi(a, np.array([1, 2, 1, 2])) == pytest.approx(0.0, abs=1e-12)
    assert purity(np.array([0, 0, 0, 1]), np.array([1, 1, 2, 2])) == pytest.approx(0.75)
    assert collision_rate(np.array([[1, 2], [1, 2], [3, 4]])) == pytest.approx(2 / 3)
    assert utilization(np.array([[0, 4], [1, 4]]), 4) == [0.5, 0.0]  # 4 = unknown code
    assert auto_codebook_size(900) == 30 and auto_codebook_size(10) == 8 and auto_codebook_size(10**6) == 256


def test_reconstruction_error_decreases_with_levels():
    x, _ = planted(noise=1.0)
    books = fit_rq_kmeans(x, SemanticIdConfig(levels=4, codebook_size=16))
    encoded = encode_with_errors(books, x)
    errors = reconstruction_error(encoded)
    assert len(errors) == 4 and all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[0] < 1.0
    # The recorded residual is exactly what decoding the codes leaves over.
    residual = books.transform(x) - decode(books, encoded.codes)
    np.testing.assert_allclose((residual**2).sum(1), encoded.level_sq_error[:, -1], rtol=1e-3, atol=1e-5)


def test_deterministic_by_seed(tmp_path):
    x, _ = planted(noise=0.8)
    cfg = SemanticIdConfig(levels=3, codebook_size=16, seed=7, max_train_points=1000)
    first, second = fit_rq_kmeans(x, cfg), fit_rq_kmeans(x, cfg)
    np.testing.assert_array_equal(first.centroids, second.centroids)
    np.testing.assert_array_equal(encode(first, x), encode(second, x))
    other = fit_rq_kmeans(x, SemanticIdConfig(levels=3, codebook_size=16, seed=8, max_train_points=1000))
    assert not np.array_equal(first.centroids, other.centroids)
    # Saved and loaded codebooks encode the same.
    first.save(tmp_path, {"note": "test"})
    np.testing.assert_array_equal(encode(RQCodebooks.load(tmp_path), x), encode(first, x))


def test_pca_whitening():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(3000, 16)) * np.linspace(0.1, 3.0, 16)).astype(np.float32)
    books = fit_rq_kmeans(x, SemanticIdConfig(levels=2, codebook_size=8, whiten="pca", whiten_dim=6, normalize=False))
    assert books.dim == 6 and books.projection.shape == (16, 6)
    z = books.transform(x)
    np.testing.assert_allclose(np.cov(z.T), np.eye(6), atol=0.05)
    assert encode(books, x).shape == (3000, 2)


def test_codebook_size_larger_than_points_is_capped():
    x, _ = planted(n_per=3, topics=5)
    with pytest.warns(RuntimeWarning, match="larger than the 15 training points"):
        books = fit_rq_kmeans(x, SemanticIdConfig(levels=2, codebook_size=64))
    assert books.codebook_size == 15
    assert collision_rate(encode(books, x)) == 0.0


def test_non_finite_embeddings_are_refused():
    x, _ = planted(n_per=10, topics=3)
    x[4, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_rq_kmeans(x, SemanticIdConfig(levels=1, codebook_size=4))


def test_collision_resolution_leaves_no_duplicates():
    rng = np.random.default_rng(2)
    distinct = rng.normal(size=(50, 8)).astype(np.float32)
    x = np.repeat(distinct, 20, axis=0)  # every vector 20 times: every tuple collides
    books = fit_rq_kmeans(x, SemanticIdConfig(levels=2, codebook_size=8))
    encoded = encode_with_errors(books, x)
    assert collision_rate(encoded.codes) == 1.0
    ids = rng.permutation(len(x)).astype(np.int64)
    rank = resolve_collisions(encoded.codes, encoded.level_sq_error[:, -1], ids)
    full = np.concatenate([encoded.codes, rank[:, None]], axis=1)
    assert collision_rate(full) == 0.0 and len(np.unique(full, axis=0)) == len(x)
    assert rank.min() == 0 and rank.max() >= 19
    # Inside a group of identical vectors the order falls to the ids: the smallest id gets 0.
    same = np.flatnonzero((encoded.codes == encoded.codes[0]).all(1))
    assert rank[same[np.argmin(ids[same])]] == 0


def test_resolve_collisions_orders_by_priority_then_id():
    codes = np.array([[1, 1], [1, 1], [1, 1], [2, 2]], np.int32)
    rank = resolve_collisions(codes, priority=np.array([0.5, 0.1, np.inf, 9.0]), ids=np.array([3, 4, 1, 2]))
    assert rank.tolist() == [1, 0, 2, 0]
    rank = resolve_collisions(codes, priority=np.array([0.2, 0.2, 0.2, 0.0]), ids=np.array([3, 4, 1, 2]))
    assert rank.tolist() == [1, 2, 0, 0]


def fallback_codes(codebooks, missing_keys, known_keys, known_vectors):
    """Codes of items without an embedding from their group's mean, fed the way encode_items
    feeds GroupMeans (known vectors in chunks)."""
    from models.semantic_ids import chunk_rows

    means = GroupMeans(missing_keys, codebooks.input_dim)
    chunk = chunk_rows(codebooks.input_dim)
    for lo in range(0, len(known_keys), chunk):
        means.add(known_keys[lo : lo + chunk], known_vectors[lo : lo + chunk])
    return means.codes(codebooks, missing_keys)


def test_fallback_for_items_without_embedding_keeps_tuples_unique(monkeypatch):
    x, labels = planted(noise=0.3)
    books = fit_rq_kmeans(x, SemanticIdConfig(levels=2, codebook_size=12))
    known_codes = encode(books, x)
    advertiser = labels + 100  # one advertiser per planted topic
    missing_keys = np.array([100, 105, 105, 999, 0, -1], np.int64)  # 999: unknown; 0/-1: no value
    codes = fallback_codes(books, missing_keys, advertiser, x)
    # Group means computed a few groups at a time (tiny chunks) give the same codes.
    monkeypatch.setattr("models.semantic_ids._CHUNK_VALUES", 24 * 200)
    np.testing.assert_array_equal(fallback_codes(books, np.arange(100, 112), advertiser, x)[[0, 5]], codes[[0, 1]])
    np.testing.assert_array_equal(encode(books, x), known_codes)
    monkeypatch.undo()
    expected = encode(books, x[advertiser == 105].mean(0, keepdims=True))[0]
    np.testing.assert_array_equal(codes[1], expected)
    np.testing.assert_array_equal(codes[1], codes[2])
    assert (codes[3:] == books.unknown_code).all()
    # The advertiser's mean lands in its topic's level-1 cell.
    assert codes[0, 0] == np.bincount(known_codes[labels == 0, 0]).argmax()
    everything = np.concatenate([known_codes, codes])
    priority = np.r_[np.zeros(len(x)), np.full(len(codes), np.inf)]
    rank = resolve_collisions(everything, priority, np.arange(len(everything)))
    full = np.concatenate([everything, rank[:, None]], axis=1)
    assert len(np.unique(full, axis=0)) == len(full)
    assert rank[-3:].tolist() == [0, 1, 2]  # the three unknown items, by id


# --- Against a real (tiny) warehouse -----------------------------------------------------
@pytest.fixture
def tiny_warehouse(tmp_path, tiny_hub):
    settings = load_settings("10M", {"data_root": str(tmp_path / "data")})
    paths = TrackPaths(settings.data_root, "10M")
    build_warehouse(tiny_hub, paths, settings)
    return paths


def test_missing_family_is_a_clear_error(tiny_warehouse):
    settings = load_settings("10M", {"data_root": str(tiny_warehouse.data_root), "semantic_ids": {"family": 84}})
    with pytest.raises(SemanticIdInputError, match=r"family 84 is not in the warehouse of track 10M \(families built: 81\).*TAAC_EMBEDDING_FAMILIES"):
        build_semantic_ids(tiny_warehouse, settings)


def test_too_few_items_is_a_clear_error_when_content_is_asked_for(tiny_warehouse):
    settings = load_settings("10M", {"data_root": str(tiny_warehouse.data_root), "semantic_ids": {"source": "content"}})
    with pytest.raises(SemanticIdInputError, match=r"family 81 covers only 6 of the 6 items.*at least 8.*SOURCE=auto"):
        build_semantic_ids(tiny_warehouse, settings)
    assert not tiny_warehouse.codebooks.exists()


def test_collaborative_sequences_stop_before_each_users_own_last_target(tiny_warehouse):
    """Training validates on a holdout user's target before its test target, so the
    co-occurrence that collaborative codes learn from must not contain it (10M: the last
    conversion, else the last click, before the test target)."""
    from taac_dagster.steps.semantic_id_tables import sequence_batches

    settings = load_settings("10M", {"data_root": str(tiny_warehouse.data_root)})
    batches = list(sequence_batches(tiny_warehouse.warehouse, settings, (2, 1)))
    flat = np.concatenate([items for items, _ in batches]).tolist()
    lengths = np.concatenate([n for _, n in batches]).tolist()
    # user 1 trains on [1, 2, 3] (before its test conversion on 3), cut before its click on 2;
    # user 2 on [2, 4, 1], cut before its click on 4; user 3 has no target: kept whole.
    assert (flat, lengths) == ([1, 2, 5, 4], [1, 1, 2])


def test_too_few_items_on_auto_falls_back_to_collaborative_vectors(tiny_warehouse):
    """The same coverage on auto: codes from the training sequences, the choice recorded."""
    settings = load_settings("10M", {"data_root": str(tiny_warehouse.data_root)})
    result = build_semantic_ids(tiny_warehouse, settings)
    assert result.source == "collaborative" and result.family is None
    assert result.coverage.to_metadata() == {
        "family": 81, "items": 6, "items_with_content": 6, "share": 1.0, "min_items": 8, "sufficient": False,
    }
    # The sequences seen are [1], [2] and [5, 4] (each holdout user's cut before its own last
    # target, see the test above): only 4 and 5 co-occur and get a vector; 3 is never seen,
    # nor is the cold candidate (no re-id).
    assert result.has_embedding.tolist() == [False, False, False, True, True, False]
    assert result.metrics["collaborative"]["items_in_sequences"] == 4
    assert len({tuple(c) for c in result.codes.tolist()}) == 6
    info = json.loads((tiny_warehouse.codebooks / "codebooks.json").read_text())
    assert info["source"] == "collaborative" and info["family"] is None
    assert info["content_coverage"]["sufficient"] is False


def test_no_family_at_all(tmp_path, tiny_hub):
    """A warehouse without embeddings: collaborative codes on auto, a clear error on content."""
    import shutil

    shutil.rmtree(tiny_hub / "mm_emb")
    settings = load_settings("10M", {"data_root": str(tmp_path / "data")})
    paths = TrackPaths(settings.data_root, "10M")
    build_warehouse(tiny_hub, paths, settings)
    result = build_semantic_ids(paths, settings)
    assert result.source == "collaborative" and result.coverage.family is None and result.coverage.share == 0.0
    content = load_settings("10M", {"data_root": str(tmp_path / "data"), "semantic_ids": {"source": "content"}})
    with pytest.raises(SemanticIdInputError, match=r"holds no embedding family.*SOURCE is 'content'"):
        build_semantic_ids(paths, content)


def test_tiny_warehouse_with_small_codebooks(tiny_warehouse, monkeypatch):
    settings = load_settings(
        "10M",
        {"data_root": str(tiny_warehouse.data_root), "semantic_ids": {"codebook_size": 2, "min_items": 2, "levels": 2}},
    )
    result = build_semantic_ids(tiny_warehouse, settings)
    assert result.metrics["collision_rate_after"] == 0.0 and "topic_recovery" not in result.metrics
    con = duckdb.connect(str(tiny_warehouse.warehouse), read_only=True)
    try:
        rows = con.execute("SELECT creative_id, item_id, codes, has_embedding FROM item_semantic_ids ORDER BY creative_id").fetchall()
    finally:
        con.close()
    assert [r[0] for r in rows] == [20_000_000_000 + i for i in range(1, 7)]
    assert rows[-1][1] is None  # the cold candidate has no re-id
    assert all(len(r[2]) == 3 and r[3] for r in rows)
    assert len({tuple(r[2]) for r in rows}) == 6
    assert (tiny_warehouse.codebooks / "codebooks.npz").is_file()
    assert RQCodebooks.load(tiny_warehouse.codebooks).codebook_size == 2
    # Streaming the family two rows at a time gives the same codes.
    monkeypatch.setattr("models.semantic_ids._CHUNK_VALUES", 8)
    np.testing.assert_array_equal(build_semantic_ids(tiny_warehouse, settings).codes, result.codes)


def test_family_reader_matches_the_file(tiny_warehouse, monkeypatch):
    from taac_dagster.readers.embeddings import read_embedding_matrix
    from taac_dagster.settings import TaacSettings
    from taac_dagster.warehouse import embedding_paths

    path = embedding_paths(tiny_warehouse.warehouse, TaacSettings())[81]
    creative, _, matrix = read_embedding_matrix(path)
    wanted_ids = np.array([creative[4], 123, creative[1], creative[5]], np.int64)  # 123: no vector
    monkeypatch.setattr("models.semantic_ids._CHUNK_VALUES", 4)  # one row per batch
    reader = FamilyReader(path, wanted_ids)
    assert reader.has_embedding.tolist() == [True, False, True, True] and reader.n_embedded == 3
    np.testing.assert_array_equal(reader.read(np.array([0, 2])), matrix[[4, 5]])
    seen = {int(i): v for idx, vecs in reader.batches() for i, v in zip(idx, vecs)}
    np.testing.assert_array_equal(np.stack([seen[0], seen[1], seen[2]]), matrix[[4, 1, 5]])


# --- The asset ------------------------------------------------------------------------------
@pytest.mark.slow
def test_asset_writes_unique_ids_for_every_item_and_candidate(tmp_path):
    config = TaacConfig(data_root=str(tmp_path / "data"), synthetic={"num_users": 300, "num_items": 900})
    with DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster_home")) as instance:
        result = materialize(
            [raw_dataset, warehouse_tables, semantic_id_codebooks],
            partition_key="1M",
            resources={"taac": config},
            instance=instance,
        )
    assert result.success
    events = [m for m in result.get_asset_materialization_events() if m.asset_key == AssetKey("semantic_id_codebooks")]
    metadata = events[0].materialization.metadata
    assert metadata["source"].value == "content:81" and metadata["family"].value == 81
    [coverage] = [e for e in result.get_asset_check_evaluations() if e.check_name == COVERAGE_CHECK]
    assert coverage.passed and coverage.metadata["source"].value == "content:81"
    assert 0.85 < coverage.metadata["coverage"].value < 0.95  # the synthetic family covers ~90%
    assert metadata["collision_rate_after"].value == 0.0
    assert len(metadata["utilization"].value) == 3
    recovery = metadata["topic_recovery"].value
    assert recovery["nmi"] > recovery["nmi_chance"] + 0.4 and recovery["purity"] > 0.8, recovery

    paths = TrackPaths(tmp_path / "data", "1M")
    con = duckdb.connect(str(paths.warehouse), read_only=True)
    try:
        n, distinct, distinct_ids, lengths = con.execute(
            "SELECT count(*), count(DISTINCT codes), count(DISTINCT creative_id), min(len(codes)) FROM item_semantic_ids"
        ).fetchall()[0]
        missing_candidates = con.execute(
            "SELECT count(*) FROM candidates c ANTI JOIN item_semantic_ids s USING (creative_id)"
        ).fetchall()[0][0]
        missing_items = con.execute(
            "SELECT count(*) FROM items i ANTI JOIN item_semantic_ids s USING (creative_id)"
        ).fetchall()[0][0]
        without_embedding = con.execute("SELECT count(*) FROM item_semantic_ids WHERE NOT has_embedding").fetchall()[0][0]
    finally:
        con.close()
    assert n == distinct == distinct_ids and lengths == 4
    assert missing_candidates == 0 and missing_items == 0
    assert without_embedding > 0  # the synthetic family covers ~90%: the fallback ran
    assert (paths.codebooks / "codebooks.npz").is_file() and (paths.codebooks / "codebooks.json").is_file()


def test_a_publish_killed_before_the_table_leaves_arrays_on_the_tables_levels(tiny_warehouse, monkeypatch, caplog):
    """The codebooks folder is renamed in first and the table with its description committed
    last (the commit point). Killed between the two (here: the table's write fails), training
    reads the levels the table's codes were built with, not the newer folder's, and says so."""
    import taac_dagster.steps.semantic_ids as sid
    from taac_dagster.steps.arrays import PrepareOptions, prepare_arrays

    def settings(levels: int):
        return load_settings("10M", {"data_root": str(tiny_warehouse.data_root),
                                     "semantic_ids": {"codebook_size": 2, "min_items": 2, "levels": levels}})

    build_semantic_ids(tiny_warehouse, settings(2))
    con = duckdb.connect(str(tiny_warehouse.warehouse), read_only=True)
    committed = json.loads(con.execute("SELECT info FROM item_semantic_ids_info").fetchall()[0][0])
    con.close()
    assert committed["levels"] == 2 and committed["build_id"] == json.loads((tiny_warehouse.codebooks / "codebooks.json").read_text())["build_id"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the table's commit")

    monkeypatch.setattr(sid, "write_item_semantic_ids", killed)
    with pytest.raises(KeyboardInterrupt):
        build_semantic_ids(tiny_warehouse, settings(3))
    folder = json.loads((tiny_warehouse.codebooks / "codebooks.json").read_text())
    assert folder["levels"] == 3 and folder["build_id"] != committed["build_id"]  # the folder alone moved on

    arrays = prepare_arrays(tiny_warehouse.warehouse, tiny_warehouse.checkpoints / "arrays", "10M",
                            PrepareOptions(val_users=1), codebooks_json=tiny_warehouse.codebooks / "codebooks.json")
    assert arrays.meta["sid_levels"] == 2 and arrays.item_sids.shape[1] == 2
    assert arrays.meta["codebooks"]["levels"] == 2
    assert f"Semantic ID build {folder['build_id']}" in caplog.text
