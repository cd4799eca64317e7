"""The asset chain on a real temporary Dagster instance, both partitions."""

from __future__ import annotations

import json
import os
import time

import pytest
from dagster import AssetKey, DagsterInstance, asset, materialize

from assets.raw import raw_dataset
from assets.warehouse import WAREHOUSE_ASSETS, warehouse_tables
from taac_dagster.paths import TrackPaths
from taac_dagster.resources import TaacConfig
from taac_dagster.settings import TaacSettings
from taac_dagster.warehouse import embedding_paths

pytestmark = pytest.mark.slow


@pytest.fixture
def instance(tmp_path):
    with DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster_home")) as inst:
        yield inst


def small_config(tmp_path, **extra):
    return TaacConfig(data_root=str(tmp_path / "data"), synthetic={"num_users": 300, "num_items": 900}, **extra)


def test_chain_materializes_both_partitions(tmp_path, instance):
    config = small_config(tmp_path)
    for track in ("1M", "10M"):
        result = materialize([raw_dataset, warehouse_tables], partition_key=track, resources={"taac": config}, instance=instance)
        assert result.success
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert len(checks) == 8 and all(e.passed for e in checks.values()), track
        materialized = {event.asset_key for event in result.get_asset_materialization_events()}
        assert materialized == {AssetKey("raw_dataset"), *(AssetKey(n) for n in WAREHOUSE_ASSETS)}
        tags = instance.get_run_by_id(result.run_id).tags  # what makes runs of one partition comparable
        assert tags["taac/data_root"] == str(tmp_path / "data") and tags["taac/source"] == "synthetic"
        assert tags["taac/preset"] == "default"
        # Every table shows its row count and columns on its asset page.
        for event in result.get_asset_materialization_events():
            if event.asset_key == AssetKey("raw_dataset"):
                continue
            meta = event.materialization.metadata
            columns = [c.name for c in meta["dagster/column_schema"].value.columns]
            assert meta["dagster/row_count"].value > 0, event.asset_key
            if "rows" in meta:
                assert meta["dagster/row_count"].value == meta["rows"].value
            assert {"events": "action_type", "items": "creative_id", "item_embeddings": "emb"}.get(
                event.asset_key.path[-1], columns[0]) in columns, (event.asset_key, columns)
        paths = TrackPaths(tmp_path / "data", track)
        assert paths.warehouse.is_file() and embedding_paths(paths.warehouse, TaacSettings())[81].is_file()
        manifest = json.loads(paths.raw_manifest.read_text())
        # The raw data version recorded by Dagster is the content fingerprint.
        raw_events = [m for m in result.get_asset_materialization_events() if m.asset_key == AssetKey("raw_dataset")]
        assert raw_events[0].materialization.tags["dagster/data_version"] == manifest["digest"]
    # 10M data has conversions; 1M data has none.
    import duckdb

    for track, has_conversions in (("1M", False), ("10M", True)):
        con = duckdb.connect(str(TrackPaths(tmp_path / "data", track).warehouse), read_only=True)
        assert (con.execute("SELECT count(*) FROM events WHERE action_type = 2").fetchall()[0][0] > 0) == has_conversions


def test_rematerializing_one_partition_leaves_the_other_alone(tmp_path, instance):
    config = small_config(tmp_path)
    for track in ("1M", "10M"):
        assert materialize([raw_dataset, warehouse_tables], partition_key=track, resources={"taac": config}, instance=instance).success
    other = TrackPaths(tmp_path / "data", "10M")
    before = {p: p.stat().st_mtime_ns for p in other.root.rglob("*") if p.is_file()}
    assert materialize([raw_dataset, warehouse_tables], partition_key="1M", resources={"taac": config}, instance=instance).success
    after = {p: p.stat().st_mtime_ns for p in other.root.rglob("*") if p.is_file()}
    assert before == after


def failure_text(result) -> str:
    """The messages of the run's step failure and its causes, as the UI shows them."""
    error = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data.error
    parts = []
    while error is not None:
        parts.append(error.message)
        error = error.cause
    return "\n".join(parts)


def _digest(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_failed_blocking_check_publishes_nothing(tmp_path, instance, demo_hub_copy):
    """Write, audit, publish: a dataset that fails a blocking check (a user on two rows) is built
    aside, checked there, and never replaces the good warehouse; the next stage does not run,
    and the error names the failed checks and where the rejected copy is kept."""
    from tests.broken_inputs import hub_duplicate_row

    ran = []

    @asset(deps=["sequences"], partitions_def=raw_dataset.partitions_def, code_version="test")
    def next_stage() -> None:
        ran.append(True)

    good = small_config(tmp_path)
    assert materialize([raw_dataset, warehouse_tables], partition_key="1M", resources={"taac": good}, instance=instance).success
    paths = TrackPaths(tmp_path / "data", "1M")
    published = {p: _digest(p) for p in [paths.warehouse, *paths.embeddings.rglob("*.parquet")]}

    hub_duplicate_row(9)(demo_hub_copy)
    broken = small_config(tmp_path, source="local", local_path=str(demo_hub_copy))
    result = materialize(
        [raw_dataset, warehouse_tables, next_stage], partition_key="1M", resources={"taac": broken},
        instance=instance, raise_on_error=False,
    )
    assert not result.success and ran == []
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["events_valid"].passed and not checks["sequences_valid"].passed
    assert checks["events_valid"].metadata["full_table_violations"].value["users_with_duplicate_positions"] == 1
    materialized = {m.asset_key for m in result.get_asset_materialization_events()}
    assert materialized == {AssetKey("raw_dataset")}
    # The published warehouse and embeddings are byte for byte the good ones.
    assert {p: _digest(p) for p in published} == published
    assert set(paths.embeddings.rglob("*.parquet")) == set(published) - {paths.warehouse}  # nothing new beside them
    [rejected] = (paths.root / "rejected").glob("warehouse-*.duckdb")
    message = failure_text(result)
    assert str(rejected) in message and "events_valid" in message and "seq/part-0.parquet row 9" in message
    assert checks["events_valid"].metadata["rejected_warehouse"].value == str(rejected)


def test_a_dataset_of_the_other_track_is_refused_before_anything_is_published(tmp_path, instance, tiny_hub):
    """Conversions in a 1M-track dataset: the reader names the file, row and field; nothing is
    published and the next stage does not run."""
    ran = []

    @asset(deps=["sequences"], partitions_def=raw_dataset.partitions_def, code_version="test")
    def next_stage() -> None:
        ran.append(True)

    config = small_config(tmp_path, source="local", local_path=str(tiny_hub))
    result = materialize(
        [raw_dataset, warehouse_tables, next_stage],
        partition_key="1M",
        resources={"taac": config},
        instance=instance,
        raise_on_error=False,
    )
    message = failure_text(result)
    assert "seq/part-0.parquet, row 0, field seq[3].action_type: expected null or one of 0, 1; found 2" in message
    # A dagster.Failure whose metadata names the file, the row, the field and the fix (the UI shows them).
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data
    meta = {key: value.value for key, value in failure.user_failure_data.metadata.items()}
    assert meta["file"].endswith("seq/part-0.parquet") and meta["row"] == 0 and meta["field"] == "seq[3].action_type"
    assert meta["error"] == "DataFormatError" and "re-materialize raw_dataset" in meta["fix"]
    assert ran == [] and not TrackPaths(tmp_path / "data", "1M").warehouse.exists()


def test_raw_files_changed_after_their_manifest_are_refused(tmp_path, instance, demo_hub_copy):
    """The warehouse re-checks the raw files against the manifest raw_dataset wrote (sizes and
    modification times): sequences swapped for other files after it are refused with the file
    named, and nothing is published."""
    import shutil

    from .conftest import write_tiny_hub

    config = small_config(tmp_path, source="local", local_path=str(demo_hub_copy))
    assert materialize([raw_dataset], partition_key="1M", resources={"taac": config}, instance=instance).success
    other = write_tiny_hub(tmp_path / "other", track="1M")
    shutil.move(demo_hub_copy / "seq", tmp_path / "seq_original")
    shutil.copytree(other / "seq", demo_hub_copy / "seq")
    result = materialize([warehouse_tables], partition_key="1M", resources={"taac": config}, instance=instance,
                         raise_on_error=False)
    message = failure_text(result)
    assert not result.success and "the raw files changed since" in message
    assert f"{demo_hub_copy / 'seq' / 'part-0.parquet'}: " in message and "materialize raw_dataset again" in message
    assert not TrackPaths(tmp_path / "data", "1M").warehouse.exists()
    # The original files back (new modification times): raw_dataset records them again, then
    # the warehouse builds.
    shutil.rmtree(demo_hub_copy / "seq")
    shutil.copytree(tmp_path / "seq_original", demo_hub_copy / "seq")
    assert materialize([raw_dataset, warehouse_tables], partition_key="1M", resources={"taac": config},
                       instance=instance).success


def test_a_step_clears_what_killed_writers_left_anywhere_in_its_track(tmp_path, instance):
    """Leftovers of interrupted writes under checkpoints/, indexes/ and vectors/ (their writers
    gone) are removed by the next writing step of the track, under its lock; a folder set aside
    by a two-rename publish that died between its renames is put back; the other track's are
    left alone."""
    paths = TrackPaths(tmp_path / "data", "1M")
    dead = "deadhost-999999-0123abcd"  # a writer on another machine whose trace is older than the grace
    leftovers = [paths.checkpoints / "default" / f".last.pt.tmp-{dead}.pt", paths.indexes / f".default.tmp-{dead}",
                 paths.vectors / "default" / f".holdout.npy.tmp-{dead}.npy"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if not path.suffix else path.write_bytes(b"half")
    aside = paths.root / f".codebooks.tmp-{dead}.old"
    aside.mkdir()
    (aside / "codebooks.json").write_text("{}")
    other = TrackPaths(tmp_path / "data", "10M").checkpoints / f".last.pt.tmp-{dead}.pt"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"half")
    old = time.time() - 2 * 24 * 3600
    for path in [*leftovers, aside, aside / "codebooks.json", other]:
        os.utime(path, (old, old))
    assert materialize([raw_dataset], partition_key="1M", resources={"taac": small_config(tmp_path)},
                       instance=instance).success
    assert not any(path.exists() for path in leftovers)
    assert (paths.codebooks / "codebooks.json").read_text() == "{}" and not aside.exists()
    assert other.exists()
