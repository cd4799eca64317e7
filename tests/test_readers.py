"""Readers of both real formats: the real fixture with its quirks, and every bad input."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from taac_dagster.errors import DataFormatError
from taac_dagster.formats import HUB_FORMAT, JSONL_FORMAT
from taac_dagster.readers.detect import detect_format
from taac_dagster.readers.embeddings import find_embedding_source, read_embedding_matrix, write_family_embeddings
from taac_dagster.readers.hub_parquet import stage_hub_dataset
from taac_dagster.readers.jsonl import stage_jsonl_dataset
from taac_dagster.readers.staging import stage_indexer


def count(con, sql):
    return con.execute(sql).fetchall()[0][0]


def test_detects_both_formats(demo_dir, tiny_hub):
    assert detect_format(demo_dir) == JSONL_FORMAT
    assert detect_format(tiny_hub) == HUB_FORMAT


def test_path_with_neither_format_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataFormatError) as err:
        detect_format(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "Hub parquet layout" in message and "notes.txt" in message


def test_missing_path_and_missing_indexer(tmp_path):
    with pytest.raises(DataFormatError, match="no such file or folder"):
        detect_format(tmp_path / "absent")
    (tmp_path / "seq.jsonl").write_text("[]\n")
    with pytest.raises(DataFormatError, match="indexer.pkl is missing"):
        detect_format(tmp_path)


def test_real_fixture_with_its_quirks(demo_dir):
    con = duckdb.connect()
    vocab = stage_jsonl_dataset(con, demo_dir)
    assert vocab == {"items": 58734, "users": 865, "features": 22}
    # 88 users, the last line has no trailing newline and is still read.
    assert count(con, "SELECT count(DISTINCT user_id) FROM stg_events") == 88
    assert count(con, "SELECT count(*) FROM stg_events") == 7956
    last_line_user = json.loads(demo_dir.joinpath("seq.jsonl").read_text().splitlines()[-1])[0][0]
    assert count(con, f"SELECT count(*) FROM stg_events WHERE user_id = {last_line_user}") > 0
    # About 1.3% of interaction records carry a null action type.
    assert count(con, "SELECT count(*) FROM stg_events WHERE action_type IS NULL") == 103
    # User profiles: one per user, multi-valued features as lists, absent ones NULL.
    assert count(con, "SELECT count(*) FROM stg_user_features") == 88
    assert count(con, "SELECT count(*) FROM stg_user_features WHERE f108 IS NOT NULL") == 17
    assert count(con, "SELECT count(*) FROM stg_user_features WHERE len(f106) >= 1") == 79
    # No item_feat_dict.json: item features come from the inline records.
    assert count(con, "SELECT count(*) FROM stg_item_features") == count(con, "SELECT count(DISTINCT item_id) FROM stg_events")
    # Real items may lack features: 3 of them have no f100.
    assert count(con, "SELECT count(*) FROM stg_item_features WHERE f100 IS NULL") == 3


def test_real_fixture_embeddings_partial_coverage(demo_dir, tmp_path):
    con = duckdb.connect()
    stage_indexer(con, demo_dir / "indexer.pkl")
    source = find_embedding_source(demo_dir, JSONL_FORMAT, 81)
    assert source.dim == 32 and source.kind == "jsonl"
    counts = write_family_embeddings(con, source, tmp_path / "emb_81.parquet")
    assert counts == {"rows": 479, "indexed_items": 479, "duplicate_ids": 0}
    creative, items, matrix = read_embedding_matrix(tmp_path / "emb_81.parquet")
    assert matrix.shape == (479, 32) and matrix.dtype.name == "float32"
    # Rows in any order (the copy streams; readers match by id), each creative once.
    assert len(np.unique(creative)) == len(creative) == 479 and (items >= 0).all()


def _rewrite_line(path, number, text):
    lines = path.read_text().split("\n")
    lines[number - 1] = text
    path.write_text("\n".join(lines))


@pytest.mark.parametrize(
    ("damage", "line", "phrase"),
    [
        ("truncate_last", 88, "truncated"),
        ("garble", 5, "invalid JSON"),
        ("five_fields", 7, "5 fields instead of 6"),
        ("string_item", 9, 'field item_id: expected an integer re-id from 1 to 2^63-1 in an interaction record; found "abc"'),
        ("object_line", 3, "found a JSON object"),
    ],
)
def test_bad_jsonl_lines_are_named(demo_copy, damage, line, phrase):
    seq = demo_copy / "seq.jsonl"
    lines = seq.read_text().split("\n")
    if damage == "truncate_last":
        seq.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    elif damage == "garble":
        _rewrite_line(seq, line, lines[line - 1][:40])
    elif damage == "five_fields":
        records = json.loads(lines[line - 1])
        records[2] = records[2][:5]
        _rewrite_line(seq, line, json.dumps(records))
    elif damage == "string_item":
        records = json.loads(lines[line - 1])
        records[0][1] = "abc"
        _rewrite_line(seq, line, json.dumps(records))
    elif damage == "object_line":
        _rewrite_line(seq, line, json.dumps({"user": 1}))
    con = duckdb.connect()
    with pytest.raises(DataFormatError) as err:
        stage_jsonl_dataset(con, demo_copy)
    assert err.value.line == line
    message = str(err.value)
    assert str(seq) in message and f"line {line}" in message and phrase in message


def test_jsonl_embedding_of_wrong_length(demo_copy):
    part = demo_copy / "creative_emb" / "emb_81_32" / "part-0000"
    lines = part.read_text().split("\n")
    row = json.loads(lines[9])
    row["emb"] = row["emb"][:31]
    lines[9] = json.dumps(row)
    part.write_text("\n".join(lines))
    con = duckdb.connect()
    stage_indexer(con, demo_copy / "indexer.pkl")
    source = find_embedding_source(demo_copy, JSONL_FORMAT, 81)
    out = demo_copy / "out" / "emb_81.parquet"
    with pytest.raises(DataFormatError) as err:
        write_family_embeddings(con, source, out)
    assert err.value.line == 10 and "length 31" in str(err.value) and str(part) in str(err.value)
    assert not out.exists() and not list((demo_copy / "out").glob(".*"))


def test_hub_layout_staged(tiny_hub):
    con = duckdb.connect()
    stage_hub_dataset(con, tiny_hub)
    assert count(con, "SELECT count(*) FROM stg_events") == 12
    assert count(con, "SELECT max(position) FROM stg_events WHERE user_id = 1") == 4
    assert count(con, "SELECT count(*) FROM stg_user_features WHERE f106 IS NOT NULL") == 2
    # Columns absent from the files are present and NULL.
    assert count(con, "SELECT count(*) FROM stg_item_features WHERE f121 IS NULL") == 5
    # The cold-start feature value is kept out of the id column and counted.
    assert con.execute("SELECT f100, cold_features FROM stg_candidates ORDER BY retrieval_id").fetchall() == [(1, 0), (None, 1)]


def test_hub_missing_column_is_named(tiny_hub):
    path = tiny_hub / "seq" / "part-0.parquet"
    table = pq.read_table(path).drop_columns(["seq"])
    pq.write_table(table, path)
    with pytest.raises(DataFormatError) as err:
        stage_hub_dataset(duckdb.connect(), tiny_hub)
    assert str(path) in str(err.value) and "column 'seq'" in str(err.value) and "['user_id']" in str(err.value)


def test_hub_mistyped_column_is_named(tiny_hub):
    path = tiny_hub / "item_feat" / "part-0.parquet"
    table = pq.read_table(path)
    table = table.set_column(0, "item_id", pa.array([str(v) for v in table.column("item_id").to_pylist()]))
    pq.write_table(table, path)
    with pytest.raises(DataFormatError) as err:
        stage_hub_dataset(duckdb.connect(), tiny_hub)
    assert str(path) in str(err.value) and "column 'item_id' of type integer" in str(err.value) and "string" in str(err.value)


def _build(source, tmp_path, track="10M"):
    from taac_dagster.paths import TrackPaths
    from taac_dagster.settings import load_settings
    from taac_dagster.warehouse import build_warehouse

    settings = load_settings(track, {"data_root": str(tmp_path / "data")})
    return build_warehouse(source, TrackPaths(settings.data_root, track), settings)


def test_hub_null_user_id_row_is_named(tiny_hub, tmp_path):
    path = tiny_hub / "seq" / "part-0.parquet"
    table = pq.read_table(path)
    table = table.set_column(0, "user_id", pa.array([1, None, 3], pa.int64()))
    pq.write_table(table, path)
    with pytest.raises(DataFormatError) as err:
        _build(tiny_hub, tmp_path)
    assert err.value.row == 1 and str(path) in str(err.value) and "non-null user_id" in str(err.value)


def test_hub_null_timestamp_in_an_event_is_named(tiny_hub, tmp_path):
    from taac_dagster.formats import HUB_SEQ_EVENT

    path = tiny_hub / "seq" / "part-0.parquet"
    table = pq.read_table(path)
    seqs = table.column("seq").to_pylist()
    seqs[2][1]["timestamp"] = None
    pq.write_table(table.set_column(1, "seq", pa.array(seqs, pa.list_(HUB_SEQ_EVENT))), path)
    with pytest.raises(DataFormatError) as err:
        _build(tiny_hub, tmp_path)
    assert err.value.row == 2 and "non-null item_id and timestamp" in str(err.value)
    assert not (tmp_path / "data" / "10M" / "warehouse.duckdb").exists()


def test_hub_embedding_of_wrong_length_is_named(tiny_hub, tmp_path):
    path = tiny_hub / "mm_emb" / "emb_81_4_parquet" / "part-0.parquet"
    table = pq.read_table(path)
    embs = table.column("emb").to_pylist()
    embs[4] = embs[4][:3]
    pq.write_table(table.set_column(1, "emb", pa.array(embs, pa.list_(pa.float32()))), path)
    con = duckdb.connect()
    stage_indexer(con, tiny_hub / "indexer.pkl")
    source = find_embedding_source(tiny_hub, HUB_FORMAT, 81)
    with pytest.raises(DataFormatError) as err:
        write_family_embeddings(con, source, tmp_path / "emb.parquet")
    assert err.value.row == 4 and "length 4" in str(err.value) and "found length 3" in str(err.value)


def test_unknown_embedding_family(tiny_hub):
    with pytest.raises(DataFormatError, match="family 83.*families 81"):
        find_embedding_source(tiny_hub, HUB_FORMAT, 83)


def test_not_a_parquet_file(tiny_hub):
    (tiny_hub / "user_feat" / "part-0.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataFormatError, match="readable parquet file"):
        stage_hub_dataset(duckdb.connect(), tiny_hub)


# --- raw ids as strings of digits (the Hub release's mm_emb.anonymous_cid) --------------------
def _hub_ids_as_strings(tiny_hub, folder: str, column: str, bad: dict[int, str] | None = None):
    [path] = (tiny_hub / folder).rglob("*.parquet")
    table = pq.read_table(path)
    values = [str(v) for v in table.column(column).to_pylist()]
    for row, value in (bad or {}).items():
        values[row] = value
    pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(values, pa.string())), path)
    return path


def test_hub_string_raw_ids_read_as_integers(tiny_hub, tmp_path):
    from tests.conftest import TINY_CREATIVE

    _hub_ids_as_strings(tiny_hub, "mm_emb", "anonymous_cid")
    _hub_ids_as_strings(tiny_hub, "candidate", "item_id")
    summary = _build(tiny_hub, tmp_path)
    assert summary.embeddings[81]["rows"] == 6 and summary.embeddings[81]["indexed_items"] == 5
    [path] = (tmp_path / "data" / "10M" / "embeddings").glob("build-*/emb_81.parquet")
    creative, items, _ = read_embedding_matrix(path)
    assert creative.dtype == "int64" and sorted(creative.tolist()) == sorted(TINY_CREATIVE.values())
    con = duckdb.connect(str(summary.path), read_only=True)
    pool = con.execute("SELECT creative_id FROM candidates WHERE in_published_pool ORDER BY retrieval_id").fetchall()
    assert pool == [(TINY_CREATIVE[3],), (TINY_CREATIVE[6],)]


@pytest.mark.parametrize("value", ["cid-17", "1.5", " 12", ""])
def test_hub_non_numeric_embedding_id_names_file_row_and_value(tiny_hub, tmp_path, value):
    path = _hub_ids_as_strings(tiny_hub, "mm_emb", "anonymous_cid", bad={3: value})
    with pytest.raises(DataFormatError) as err:
        _build(tiny_hub, tmp_path)
    message = str(err.value)
    assert err.value.row == 3 and str(path) in message and repr(value) in message
    assert "integer or string of digits" in message
    assert not (tmp_path / "data" / "10M" / "warehouse.duckdb").exists()


def test_hub_non_numeric_candidate_id_is_named(tiny_hub, tmp_path):
    path = _hub_ids_as_strings(tiny_hub, "candidate", "item_id", bad={1: "x20000000006"})
    with pytest.raises(DataFormatError) as err:
        stage_hub_dataset(duckdb.connect(), tiny_hub)
    assert err.value.row == 1 and str(path) in str(err.value) and "'x20000000006'" in str(err.value)


def test_jsonl_embedding_ids_as_strings_and_a_bad_one(demo_copy, tmp_path):
    part = demo_copy / "creative_emb" / "emb_81_32" / "part-0000"
    rows = [json.loads(line) for line in part.read_text().splitlines()]
    for row in rows:
        row["anonymous_cid"] = str(row["anonymous_cid"])
    part.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    con = duckdb.connect()
    stage_indexer(con, demo_copy / "indexer.pkl")
    source = find_embedding_source(demo_copy, JSONL_FORMAT, 81)
    counts = write_family_embeddings(con, source, tmp_path / "strings.parquet")
    assert counts == {"rows": 479, "indexed_items": 479, "duplicate_ids": 0}

    rows[6]["anonymous_cid"] = "12ab"
    part.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    with pytest.raises(DataFormatError) as err:
        write_family_embeddings(con, source, tmp_path / "bad.parquet")
    assert err.value.line == 7 and str(part) in str(err.value)
    assert err.value.field == "anonymous_cid" and 'found "12ab"' in str(err.value)
    assert not (tmp_path / "bad.parquet").exists()


def test_pickle_embedding_keys_as_strings_and_a_bad_one(tmp_path):
    import pickle

    from taac_dagster.readers.embeddings import EmbeddingSource

    con = duckdb.connect()
    con.execute("CREATE TABLE stg_item_index AS SELECT 1001::BIGINT AS creative_id, 1::BIGINT AS item_id")
    path = tmp_path / "emb_81_2.pkl"
    path.write_bytes(pickle.dumps({"1001": [0.1, 0.2], 1002: [0.3, 0.4]}))
    source = EmbeddingSource(81, 2, path, "pickle")
    assert write_family_embeddings(con, source, tmp_path / "ok.parquet") == {"rows": 2, "indexed_items": 1, "duplicate_ids": 0}
    path.write_bytes(pickle.dumps({"1001": [0.1, 0.2], "cid_2": [0.3, 0.4]}))
    with pytest.raises(DataFormatError) as err:
        write_family_embeddings(con, source, tmp_path / "bad.parquet")
    assert err.value.row == 1 and str(path) in str(err.value) and "'cid_2'" in str(err.value)


def test_one_long_string_in_a_pickled_family_is_named_not_sized_into_every_cell(tmp_path):
    """numpy would size every cell of the [items, dim] matrix to the longest string (2,000
    vectors x 32 x 1 MB here): the element is named before numpy sees the values."""
    import pickle

    from taac_dagster.readers.embeddings import EmbeddingSource

    con = duckdb.connect()
    con.execute("CREATE TABLE stg_item_index AS SELECT 1001::BIGINT AS creative_id, 1::BIGINT AS item_id")
    family = {1000 + i: [0.5] * 32 for i in range(2000)}
    family[1500] = [0.5] * 31 + ["x" * 1_000_000]
    path = tmp_path / "emb_81_32.pkl"
    path.write_bytes(pickle.dumps(family))
    with pytest.raises(DataFormatError) as err:
        write_family_embeddings(con, EmbeddingSource(81, 32, path, "pickle"), tmp_path / "out.parquet")
    assert err.value.row == 500 and "element 31" in str(err.value) and str(path) in str(err.value)


def test_running_out_of_memory_while_copying_embeddings_is_not_called_bad_data(tmp_path, monkeypatch):
    """DuckDB's memory limit hit while writing a family is the limit's doing, not the file's: it
    passes through as itself, not as a DataFormatError blaming the embeddings."""
    from taac_dagster.readers import embeddings
    from taac_dagster.readers.embeddings import EmbeddingSource

    folder = tmp_path / "emb_81_4_parquet"
    folder.mkdir()
    pq.write_table(pa.table({"anonymous_cid": pa.array([1, 2], pa.int64()),
                             "emb": pa.array([[0.1] * 4, [0.2] * 4], pa.list_(pa.float32()))}), folder / "part-0.parquet")
    con = duckdb.connect()
    con.execute("CREATE TABLE stg_item_index AS SELECT 1::BIGINT AS creative_id, 7::BIGINT AS item_id")
    source = EmbeddingSource(family=81, dim=4, kind="parquet", path=folder)
    assert write_family_embeddings(con, source, tmp_path / "ok.parquet") == {"rows": 2, "indexed_items": 1, "duplicate_ids": 0}

    def out_of_memory(*args, **kwargs):
        raise duckdb.OutOfMemoryException("Out of Memory Error: failed to allocate data of size 4.0 MiB")

    monkeypatch.setattr(embeddings, "_copy_sql", out_of_memory)
    with pytest.raises(duckdb.OutOfMemoryException):
        write_family_embeddings(con, source, tmp_path / "oom.parquet")
    assert not (tmp_path / "oom.parquet").exists()


# --- folders named like glob patterns ---------------------------------------------------------
# DuckDB expands *, ? and [...] in every path it reads, lists of files too: without care a folder
# a[1] reads the files of its sibling a1. Each test gives a1 different data and reads a[1].
def _keep_first_rows(path, n):
    pq.write_table(pq.read_table(path).slice(0, n), path)


def test_hub_folder_named_like_a_glob_reads_only_its_own_files(tmp_path):
    from tests.conftest import write_tiny_hub

    own = write_tiny_hub(tmp_path / "a[1]")
    other = write_tiny_hub(tmp_path / "a1")
    for path in other.rglob("*.parquet"):
        _keep_first_rows(path, 1)
    con = duckdb.connect()
    stage_hub_dataset(con, own)
    assert count(con, "SELECT count(*) FROM stg_events") == 12
    assert count(con, "SELECT count(*) FROM stg_candidates") == 2
    source = find_embedding_source(own, HUB_FORMAT, 81)
    out = tmp_path / "out[1]" / "emb_81.parquet"  # the written file is read back too
    out.parent.mkdir()
    assert write_family_embeddings(con, source, out)["rows"] == sum(pq.read_metadata(f).num_rows for f in source.path.glob("*.parquet"))


def test_jsonl_folder_named_like_a_glob_reads_only_its_own_files(demo_dir, tmp_path):
    import shutil

    from taac_dagster.readers.jsonl import locate_users_jsonl

    own, other = tmp_path / "a[1]", tmp_path / "a1"
    shutil.copytree(demo_dir, own)
    shutil.copytree(demo_dir, other)
    lines = (other / "seq.jsonl").read_text().splitlines()
    (other / "seq.jsonl").write_text("\n".join(lines[:3]) + "\n")
    [part] = (other / "creative_emb" / "emb_81_32").iterdir()
    part.write_text("\n".join(part.read_text().splitlines()[:2]) + "\n")
    con = duckdb.connect()
    stage_jsonl_dataset(con, own)
    assert count(con, "SELECT count(*) FROM stg_events") == 7956
    last_user = json.loads(lines[-1])[0][0]
    assert last_user in locate_users_jsonl(con, own / "seq.jsonl", [last_user])
    counts = write_family_embeddings(con, find_embedding_source(own, JSONL_FORMAT, 81), tmp_path / "emb_81.parquet")
    assert counts["rows"] == 479
