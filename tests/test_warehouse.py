"""The DuckDB tables: built from both formats, and the invariants each one promises."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from taac_dagster.errors import DataFormatError
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import load_settings
from taac_dagster.warehouse import build_checked_warehouse, build_warehouse

from .conftest import TINY_CREATIVE


def build(source, tmp_path, track, *, builder=build_warehouse, **overrides):
    settings = load_settings(track, {"data_root": str(tmp_path / "data"), "embedding_families": [81], **overrides})
    paths = TrackPaths(settings.data_root, track)
    summary = builder(source, paths, settings)
    summary = summary[0] if isinstance(summary, tuple) else summary  # build_checked_warehouse: (summary, outcomes)
    return summary, duckdb.connect(str(paths.warehouse), read_only=True)


def rows(con, sql):
    return con.execute(sql).fetchall()


def test_tiny_hub_10m_tables(tiny_hub, tmp_path):
    summary, con = build(tiny_hub, tmp_path, "10M")
    assert summary.row_counts == {
        "feature_vocab": 3, "events": 12, "items": 5, "users": 3, "holdout": 2, "sequences": 3, "candidates": 3,
    }
    # User 1: the target is the last conversion, not the later exposure; user 2: last click.
    assert rows(con, "SELECT user_id, target_item_id, target_action_type, target_position, history_item_ids FROM holdout ORDER BY user_id") == [
        (1, 3, 2, 3, [1, 2, 3]),
        (2, 5, 1, 3, [2, 4, 1]),
    ]
    # Training stops strictly before the target; a user without clicks keeps all events.
    assert rows(con, "SELECT user_id, item_ids, action_types, last_position FROM sequences ORDER BY user_id") == [
        (1, [1, 2, 3], [0, 1, 0], 2),
        (2, [2, 4, 1], [0, 1, 0], 2),
        (3, [5, 4], [0, 0], 1),
    ]
    # Published pool (items 3 and cold 6) plus user 2's target, added with a fresh retrieval id
    # and not released: a submission never recommends it, the report's headline counts it a miss.
    assert rows(con, "SELECT creative_id, item_id, retrieval_id, in_published_pool, released, is_cold FROM candidates ORDER BY retrieval_id") == [
        (TINY_CREATIVE[3], 3, 1, True, True, False),
        (TINY_CREATIVE[6], None, 2, True, True, True),
        (TINY_CREATIVE[5], 5, 3, False, False, False),
    ]
    assert rows(con, "SELECT raw_user_id, f103, f106 FROM users ORDER BY user_id") == [
        ("user_001", 1, [1, 2]), ("user_002", 2, None), ("user_003", None, [2])
    ]
    # Embeddings: all 6 creatives, the cold one without a re-id.
    assert summary.embeddings[81]["rows"] == 6 and summary.embeddings[81]["indexed_items"] == 5
    assert rows(con, "SELECT family, dim, rows FROM embedding_families") == [(81, 4, 6)]
    staging = rows(con, "SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE 'stg_%'")
    assert staging == [(0,)]


def test_tiny_hub_1m_target_is_last_click(tiny_hub, tmp_path):
    from .conftest import write_tiny_hub

    source = write_tiny_hub(tmp_path / "tiny_1m", track="1M")
    _, con = build(source, tmp_path, "1M")
    assert rows(con, "SELECT user_id, target_item_id, target_action_type, target_item_ids FROM holdout ORDER BY user_id") == [
        (1, 3, 1, [3]),
        (2, 5, 1, [5]),
    ]


def test_weighted_targets_include_later_clicks(tiny_hub, tmp_path):
    """10M: clicks after the last conversion are extra targets for the weighted metrics."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from taac_dagster.formats import HUB_SEQ_EVENT

    path = tiny_hub / "seq" / "part-0.parquet"
    table = pq.read_table(path)
    seqs = table.column("seq").to_pylist()
    seqs[0].append({"item_id": 5, "action_type": 1, "timestamp": 150})
    pq.write_table(table.set_column(1, "seq", pa.array(seqs, pa.list_(HUB_SEQ_EVENT))), path)
    _, con = build(tiny_hub, tmp_path, "10M")
    assert rows(con, "SELECT target_item_id, target_item_ids, target_action_types FROM holdout WHERE user_id = 1") == [
        (3, [3, 5], [2, 1])
    ]


def test_real_fixture_invariants(demo_dir, tmp_path):
    summary, con = build(demo_dir, tmp_path, "1M")
    assert summary.row_counts["events"] == 7956 and summary.row_counts["users"] == 88
    assert summary.missing_action_types == 103
    # Positions are 0..n-1 within each user.
    assert rows(con, "SELECT count(*) FROM (SELECT user_id FROM events GROUP BY user_id HAVING max(position) + 1 <> count(*) OR min(position) <> 0)") == [(0,)]
    # Every holdout target is the user's last click with a known action type.
    assert rows(con, """
        SELECT count(*) FROM holdout h WHERE h.target_position <> (
            SELECT max(position) FROM events e WHERE e.user_id = h.user_id AND e.action_type = 1 AND NOT e.action_type_missing)
    """) == [(0,)]
    assert rows(con, "SELECT max(length) <= 100, min(length) >= 1 FROM sequences") == [(True, True)]
    assert rows(con, "SELECT count(*) FROM sequences s JOIN holdout h USING (user_id) WHERE s.last_position >= h.target_position") == [(0,)]
    assert rows(con, "SELECT count(*) FROM holdout h ANTI JOIN candidates c ON c.item_id = h.target_item_id") == [(0,)]
    # No published pool: every item is a candidate, and all of them are released.
    assert rows(con, "SELECT count(*), count(*) FILTER (WHERE released), count(*) FILTER (WHERE in_published_pool) FROM candidates") == [(7500, 7500, 0)]
    # Missing action types never become targets.
    assert rows(con, "SELECT count(*) FROM holdout h JOIN events e ON e.user_id = h.user_id AND e.position = h.target_position WHERE e.action_type_missing") == [(0,)]
    assert rows(con, "SELECT count(*) FROM items WHERE creative_id IS NULL") == [(0,)]


def test_sequences_keep_the_latest_events(demo_dir, tmp_path):
    _, con = build(demo_dir, tmp_path, "1M", max_history=10)
    assert rows(con, "SELECT max(length) FROM sequences") == [(10,)]
    # The kept events are the 10 right before the target.
    assert rows(con, "SELECT count(*) FROM sequences s JOIN holdout h USING (user_id) WHERE s.last_position <> h.target_position - 1 AND h.target_position > 0") == [(0,)]


def test_failed_build_keeps_the_previous_warehouse(demo_copy, tmp_path):
    summary, con = build(demo_copy, tmp_path, "1M")
    con.close()
    before = summary.path.read_bytes()
    seq = demo_copy / "seq.jsonl"
    seq.write_text(seq.read_text()[:-50])  # truncate the last line
    with pytest.raises(DataFormatError, match="line 88"):
        build(demo_copy, tmp_path, "1M")
    assert summary.path.read_bytes() == before
    leftovers = [p.name for p in summary.path.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    [(path,)] = duckdb.connect(str(summary.path), read_only=True).execute("SELECT path FROM embedding_families").fetchall()
    assert Path(path).is_file()


def test_leftovers_of_a_crashed_build_are_cleared(demo_dir, tmp_path):
    root = tmp_path / "data" / "1M"
    root.mkdir(parents=True)
    crashed = root / ".warehouse.duckdb.tmp-deadbeef.duckdb"
    crashed.write_bytes(b"half a database")
    (root / ".embeddings.tmp-deadbeef").mkdir()
    summary, _ = build(demo_dir, tmp_path, "1M")
    assert sorted(p.name for p in root.iterdir()) == ["embeddings", "warehouse.duckdb"]
    assert summary.path == root / "warehouse.duckdb"


def _info(con) -> dict[str, str]:
    return dict(rows(con, "SELECT key, value FROM warehouse_info"))


def test_families_on_auto_are_the_ones_the_dataset_holds(demo_copy, tmp_path):
    """Auto reads every family found and records the choice; without an embedding folder it
    reads none, and the tables are built from ids, features and actions alone."""
    summary, con = build(demo_copy, tmp_path / "with", "1M", embedding_families=None)
    assert summary.families == [81] and summary.families_requested is None
    assert rows(con, "SELECT family, dim FROM embedding_families") == [(81, 32)]
    assert _info(con)["embedding_families"] == "81" and _info(con)["embedding_families_requested"] == "auto"
    assert summary.to_metadata()["embedding_families_requested"] == "auto"

    import shutil

    shutil.rmtree(demo_copy / "creative_emb")
    summary, con = build(demo_copy, tmp_path / "without", "1M", embedding_families=None)
    assert summary.families == [] and summary.embeddings == {}
    assert rows(con, "SELECT count(*) FROM embedding_families") == [(0,)]
    assert _info(con)["embedding_families"] == "none"
    assert summary.row_counts["events"] == 7956 and summary.row_counts["sequences"] == 88
    assert not list((tmp_path / "without" / "data" / "1M" / "embeddings").iterdir())


@pytest.mark.parametrize(("remove_folder", "found"), [(False, "families 81"), (True, "families none")])
def test_a_requested_family_the_dataset_lacks_is_a_clear_error(demo_copy, tmp_path, remove_folder, found):
    import shutil

    if remove_folder:
        shutil.rmtree(demo_copy / "creative_emb")
    with pytest.raises(DataFormatError) as err:
        build(demo_copy, tmp_path, "1M", embedding_families=[81, 82] if not remove_folder else [81])
    message = str(err.value)
    family = 82 if not remove_folder else 81
    assert str(demo_copy / "creative_emb") in message and f"embeddings of family {family}" in message
    assert found in message and "TAAC_EMBEDDING_FAMILIES" in message
    assert not (tmp_path / "data" / "1M" / "warehouse.duckdb").exists()


def _published_pair(root):
    """What a reader sees: the database's embedding dim and row count, and the file it names."""
    import pyarrow.parquet as pq

    con = duckdb.connect(str(root / "warehouse.duckdb"), read_only=True)
    try:
        [(dim, count, path)] = rows(con, "SELECT dim, rows, path FROM embedding_families")
    finally:
        con.close()
    table = pq.read_table(path)
    return dim, count, len(table.column("emb")[0]), table.num_rows


@pytest.mark.parametrize(
    ("failing", "builder"),
    [("embeddings", build_warehouse), ("database", build_warehouse), ("database", build_checked_warehouse)],
    ids=["embeddings", "database", "database-checked"],
)
def test_a_failed_publish_rename_leaves_the_old_pair_in_place(tmp_path, monkeypatch, failing, builder):
    """The publish renames the embeddings into a build folder no database reads yet, then the
    database (the commit point): when either rename fails, the error surfaces and readers still
    see the previous database with its own embeddings (4-d before, 8-d in the failed build).
    Kills at every point: tests/test_crash_points.py."""
    import os

    from taac_dagster.settings import TaacSettings
    from taac_dagster.warehouse import embedding_paths

    from .conftest import write_tiny_hub

    build(write_tiny_hub(tmp_path / "old", emb_dim=4), tmp_path, "10M")[1].close()
    root = tmp_path / "data" / "10M"
    published = lambda: embedding_paths(root / "warehouse.duckdb", TaacSettings())[81]  # noqa: E731
    before = (root / "warehouse.duckdb").read_bytes(), published().read_bytes()
    assert _published_pair(root) == (4, 6, 4, 6)

    def is_target(dst) -> bool:
        dst = Path(dst)
        if failing == "embeddings":
            return dst.parent == root / "embeddings" and dst.name.startswith("build-")
        return dst == root / "warehouse.duckdb"

    real_replace, calls = os.replace, []

    def replace(src, dst, **kwargs):
        if is_target(dst) and not calls:
            calls.append(src)
            raise OSError(28, "No space left on device (injected)")
        return real_replace(src, dst, **kwargs)

    if builder is build_checked_warehouse:  # the publish is under test here, not the checks (test_quality.py)
        import taac_dagster.warehouse

        monkeypatch.setattr(taac_dagster.warehouse, "run_checks", lambda *args, **kwargs: [])
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        build(write_tiny_hub(tmp_path / "new", emb_dim=8), tmp_path, "10M", builder=builder)
    assert len(calls) == 1 and ".tmp-" in os.fspath(calls[0])  # the staged copy's rename failed
    monkeypatch.setattr(os, "replace", real_replace)

    assert ((root / "warehouse.duckdb").read_bytes(), published().read_bytes()) == before
    assert _published_pair(root) == (4, 6, 4, 6)
    assert sorted(p.name for p in root.iterdir()) == ["embeddings", "warehouse.duckdb"]  # nothing staged or set aside left
    assert [p for p in (root / "embeddings").iterdir()] == [published().parent]  # nor an unread build
    build(tmp_path / "new", tmp_path, "10M")[1].close()  # the next publish goes through
    assert _published_pair(root) == (8, 6, 8, 6)
