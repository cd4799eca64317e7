"""The Great Expectations checks pass on good data and fail, with counts, on broken tables."""

from __future__ import annotations

import shutil

import duckdb
import pytest

from taac_dagster.paths import TrackPaths
from taac_dagster.quality import CHECKS, run_checks
from taac_dagster.settings import load_settings
from taac_dagster.warehouse import build_warehouse


@pytest.fixture(scope="module")
def fixture_warehouse(tmp_path_factory):
    from tests.conftest import DEMO_FIXTURE

    root = tmp_path_factory.mktemp("quality")
    settings = load_settings("1M", {"data_root": str(root)})
    paths = TrackPaths(settings.data_root, "1M")
    return build_warehouse(DEMO_FIXTURE, paths, settings).path


@pytest.fixture
def broken(fixture_warehouse, tmp_path):
    """A copy of the good warehouse and a function that damages it with SQL."""
    copy = tmp_path / "warehouse.duckdb"
    shutil.copy(fixture_warehouse, copy)

    def damage(*statements: str):
        con = duckdb.connect(str(copy))
        for statement in statements:
            con.execute(statement)
        con.close()
        return copy

    return damage


def outcomes(path, track="1M", names=None, sample_users=20_000):
    return {o.name: o for o in run_checks(path, track, max_history=100, sample_users=sample_users, names=names)}


def test_real_fixture_passes_with_a_warning(fixture_warehouse):
    results = outcomes(fixture_warehouse)
    assert set(results) == {spec.name for spec in CHECKS}
    failed = {name for name, o in results.items() if not o.passed}
    assert failed == {"events_missing_action_types"}
    warning = results["events_missing_action_types"]
    assert warning.severity == "WARN" and warning.metadata["missing_action_types"] == 103
    ge = results["events_valid"].metadata["ge"]
    assert ge["success"] and ge["rows_validated"] == 7956 and ge["expectations"] >= 10


def test_action_type_outside_the_track(broken):
    path = broken("UPDATE events SET action_type = 2 WHERE user_id = 1 AND position = 0")
    result = outcomes(path, names=["events_valid"])["events_valid"]
    assert not result.passed
    assert result.metadata["full_table_violations"]["action_type_not_allowed"] == 1
    failed = [f["expectation"] for f in result.metadata["ge"]["failures"]]
    assert failed == ["expect_column_values_to_be_in_set"]
    # The same value is allowed on the 10M track.
    assert outcomes(path, track="10M", names=["events_valid"])["events_valid"].passed


def test_timestamps_going_back(broken):
    path = broken('UPDATE events SET "timestamp" = 0 WHERE user_id = 1 AND position = 5')
    result = outcomes(path, names=["events_valid"])["events_valid"]
    assert not result.passed and result.metadata["full_table_violations"]["timestamp_decreases"] == 1


def test_event_item_missing_from_items(broken):
    path = broken("DELETE FROM items WHERE item_id = (SELECT item_id FROM events WHERE user_id = 1 AND position = 0)")
    result = outcomes(path, names=["events_valid"])["events_valid"]
    assert not result.passed and result.metadata["full_table_violations"]["item_not_in_items"] >= 1


def test_feature_value_outside_vocabulary(broken):
    path = broken("UPDATE items SET f100 = 99 WHERE item_id = (SELECT min(item_id) FROM items)")
    result = outcomes(path, names=["items_valid"])["items_valid"]
    assert not result.passed
    failure = result.metadata["ge"]["failures"][0]
    assert failure["kwargs"]["column"] == "f100" and failure["unexpected_count"] == 1


def test_target_leak_and_long_history(broken):
    path = broken(
        "UPDATE sequences SET last_position = last_position + 1 WHERE user_id = 1",
        "UPDATE sequences SET length = 101 WHERE user_id = 2",
    )
    result = outcomes(path, names=["sequences_valid"])["sequences_valid"]
    assert not result.passed
    assert result.metadata["full_table_violations"]["target_leaks"] == 1
    assert result.metadata["full_table_violations"]["too_long"] == 1


def test_target_missing_from_candidates(broken):
    path = broken("DELETE FROM candidates WHERE item_id = (SELECT target_item_id FROM holdout WHERE user_id = 1)")
    result = outcomes(path, names=["holdout_valid"])["holdout_valid"]
    assert not result.passed and result.metadata["full_table_violations"]["target_not_in_candidates"] >= 1


def test_empty_candidate_pool(broken):
    path = broken("DELETE FROM candidates")
    assert not outcomes(path, names=["candidates_valid"])["candidates_valid"].passed


def test_duplicate_user(broken):
    path = broken("INSERT INTO users SELECT * FROM users WHERE user_id = 1")
    result = outcomes(path, names=["users_valid"])["users_valid"]
    assert not result.passed and result.metadata["full_table_violations"]["duplicate_user_ids"] == 1


def test_embedding_dimension(broken, tmp_path):
    bad = tmp_path / "emb_bad.parquet"
    con = duckdb.connect()
    good = duckdb.connect(str(broken())).execute("SELECT path FROM embedding_families").fetchall()[0][0]
    con.execute(f"COPY (SELECT creative_id, item_id, CAST(emb AS FLOAT[])[1:31] AS emb FROM read_parquet('{good}')) TO '{bad}' (FORMAT parquet)")
    path = broken(f"UPDATE embedding_families SET path = '{bad}'")
    result = outcomes(path, names=["embeddings_valid"])["embeddings_valid"]
    assert not result.passed and result.metadata["full_table_violations"]["family_81_wrong_dim"] == 479


def test_sampling_validates_a_deterministic_subset(fixture_warehouse):
    first = outcomes(fixture_warehouse, names=["events_valid"], sample_users=100)["events_valid"]
    sampled = outcomes(fixture_warehouse, names=["events_valid"], sample_users=20)["events_valid"]
    again = outcomes(fixture_warehouse, names=["events_valid"], sample_users=20)["events_valid"]
    assert first.metadata["sample_modulus"] == 1 and sampled.metadata["sample_modulus"] == 5
    assert 0 < sampled.metadata["ge"]["rows_validated"] < first.metadata["ge"]["rows_validated"]
    assert sampled.metadata["ge"]["rows_validated"] == again.metadata["ge"]["rows_validated"]


def test_embedding_file_in_a_folder_named_like_a_glob_is_the_one_checked(tmp_path):
    # DuckDB would read a[1]/emb_81.parquet as the pattern it looks like, matching a1's file.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from taac_dagster.quality import CheckContext
    from taac_dagster.quality.embeddings import check_embeddings

    for folder, dim in (("a[1]", 4), ("a1", 3)):
        (tmp_path / folder).mkdir()
        emb = pa.array([[0.5] * dim] * 2, pa.list_(pa.float32()))
        pq.write_table(pa.table({"creative_id": [1, 2], "item_id": [1, 2], "emb": emb}), tmp_path / folder / "emb_81.parquet")
    ctx = CheckContext(duckdb.connect(), "1M", 100, 1, [(81, 4, str(tmp_path / "a[1]" / "emb_81.parquet"))])
    outcome = check_embeddings(ctx)
    assert outcome.passed, outcome.description
