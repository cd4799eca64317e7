"""Operating the chain: the retraining schedule and declarative automation on a real instance."""

from __future__ import annotations

import datetime as dt

import pytest
from dagster import DagsterInstance, Definitions, build_schedule_context, evaluate_automation_conditions, materialize

from taac_dagster.definitions import defs
from taac_dagster.resources import TaacConfig

pytestmark = pytest.mark.slow


def test_schedule_requests_one_run_per_track():
    schedule = defs.resolve_schedule_def("taac_retraining")
    assert schedule.cron_schedule == "0 3 * * 1" and schedule.job_name == "taac_retrain"
    context = build_schedule_context(
        scheduled_execution_time=dt.datetime(2026, 11, 23, 3, 0, tzinfo=dt.UTC),
        repository_def=defs.get_repository_def(),
    )
    requests = list(schedule.evaluate_tick(context).run_requests)
    assert [r.partition_key for r in requests] == ["1M", "10M"]
    assert [r.tags["taac/track"] for r in requests] == ["1M", "10M"]
    assert len({r.run_key for r in requests}) == 2


def _data_assets():
    """raw_dataset and the warehouse tables, with their automation conditions."""
    from assets.raw import raw_dataset
    from assets.warehouse import warehouse_tables

    return [raw_dataset, warehouse_tables]



def test_new_raw_data_requests_exactly_that_track_downstream(tmp_path):
    assets = _data_assets()
    with DagsterInstance.ephemeral(tempdir=str(tmp_path / "home")) as instance:
        config = TaacConfig(data_root=str(tmp_path / "data"), synthetic={"num_users": 200, "num_items": 600})
        for track in ("1M", "10M"):
            assert materialize(assets, partition_key=track, resources={"taac": config}, instance=instance).success
        automated = Definitions(assets=assets, resources={"taac": config})
        first = evaluate_automation_conditions(defs=automated, instance=instance)
        settled = evaluate_automation_conditions(defs=automated, instance=instance, cursor=first.cursor)
        assert settled.total_requested == 0
        new_seed = TaacConfig(data_root=str(tmp_path / "data"), synthetic={"num_users": 200, "num_items": 600, "seed": 99})
        raw = [a for a in assets if a.node_def.name == "raw_dataset"]
        assert materialize(raw, partition_key="1M", resources={"taac": new_seed}, instance=instance).success
        after = evaluate_automation_conditions(defs=automated, instance=instance, cursor=settled.cursor)
        requested = {(r.key.to_user_string(), pk) for r in after.results for pk in r.true_subset.expensively_compute_partition_keys()}
        assert ("events", "1M") in requested and ("sequences", "1M") in requested
        assert not any(pk == "10M" for _, pk in requested)
        assert ("raw_dataset", "1M") not in requested


@pytest.mark.parametrize("broken", [False, True])
def test_failed_blocking_check_holds_back_the_next_stage(tmp_path, demo_hub_copy, broken):
    """A user on two rows fails events_valid: the next stage is not requested."""
    from dagster import asset

    from taac_dagster.automation import downstream_condition
    from taac_dagster.partitions import track_partitions

    @asset(deps=["events"], partitions_def=track_partitions, code_version="1", automation_condition=downstream_condition())
    def next_stage() -> None: ...

    from tests.broken_inputs import hub_duplicate_row

    hub_duplicate_row(9)(demo_hub_copy)
    source = {"source": "local", "local_path": str(demo_hub_copy)} if broken else {}
    config = TaacConfig(data_root=str(tmp_path / "data"), synthetic={"num_users": 200, "num_items": 600}, **source)
    assets = _data_assets()
    automated = Definitions(assets=[*assets, next_stage], resources={"taac": config})
    with DagsterInstance.ephemeral(tempdir=str(tmp_path / "home")) as instance:
        before = evaluate_automation_conditions(defs=automated, instance=instance)
        result = materialize(assets, partition_key="1M", resources={"taac": config}, instance=instance, raise_on_error=False)
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks["events_valid"] is (not broken)
        evaluation = evaluate_automation_conditions(defs=automated, instance=instance, cursor=before.cursor)
        requested = {(r.key.to_user_string(), pk) for r in evaluation.results for pk in r.true_subset.expensively_compute_partition_keys()}
        assert (("next_stage", "1M") in requested) is (not broken)


def test_new_raw_data_marks_exactly_that_track_stale(tmp_path, monkeypatch):
    """The whole chain on both tracks; a new 1M dataset makes the 1M chain stale level by level
    as it is re-materialized, never 10M; the same content again makes nothing stale."""
    from dagster import AssetKey
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    from assets.evaluation import evaluation_report, submission, user_vectors
    from assets.raw import raw_dataset
    from assets.retrieval import faiss_index
    from assets.semantic_ids import semantic_id_codebooks
    from assets.training import encoder_checkpoint
    from assets.warehouse import warehouse_tables

    monkeypatch.setenv("TAAC_TRAINING__MAX_STEPS", "5")
    monkeypatch.setenv("TAAC_TRAINING__VAL_USERS", "0")
    monkeypatch.setenv("TAAC_TRAINING__THREADS", "1")
    chain = [raw_dataset, warehouse_tables, semantic_id_codebooks, encoder_checkpoint, faiss_index, user_vectors,
         evaluation_report, submission]
    graph = defs.resolve_asset_graph()
    keys = sorted(graph.get_all_asset_keys())
    below_raw = {key.to_user_string() for key in keys} - {"raw_dataset"}
    assert {"events", "encoder_checkpoint", "faiss_index", "user_vectors",
            "evaluation_report", "submission"} <= below_raw
    with DagsterInstance.ephemeral(tempdir=str(tmp_path / "home")) as instance:

        def stale() -> set[tuple[str, str]]:
            resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
            return {
                (key.to_user_string(), track)
                for key in keys
                for track in ("1M", "10M")
                if resolver.get_status(key, track).value == "STALE"
            }

        config = TaacConfig(data_root=str(tmp_path / "data"), synthetic={"num_users": 200, "num_items": 600})
        for track in ("1M", "10M"):
            assert materialize(chain, partition_key=track, resources={"taac": config}, instance=instance).success
        assert stale() == set()
        # The same seed gives the same content: nothing becomes stale.
        assert materialize([raw_dataset], partition_key="1M", resources={"taac": config}, instance=instance).success
        assert stale() == set()
        reseeded = TaacConfig(data_root=str(tmp_path / "data"), synthetic={"num_users": 200, "num_items": 600, "seed": 99})
        assert materialize([raw_dataset], partition_key="1M", resources={"taac": reseeded}, instance=instance).success

        def children(names: set[str]) -> set[str]:
            return {c.to_user_string() for n in names for c in graph.get(AssetKey(n)).child_keys} - names

        # Dagster marks an asset stale when an input it read has a new data version: the tables
        # built from the raw data first; re-materializing them moves the staleness one level down
        # (their data versions derive from the new raw version), until the chain has caught up.
        # Only the 1M partition is ever stale.
        tables = children({"raw_dataset"})
        assert "events" in tables and "semantic_id_codebooks" not in tables
        assert stale() == {(name, "1M") for name in tables}
        assert materialize([warehouse_tables], partition_key="1M", resources={"taac": reseeded}, instance=instance).success
        after_tables = children(tables)
        assert {"semantic_id_codebooks", "encoder_checkpoint", "faiss_index", "submission"} <= after_tables
        assert stale() == {(name, "1M") for name in after_tables}
        assert materialize(chain[2:], partition_key="1M", resources={"taac": reseeded}, instance=instance).success
        assert stale() == set()
        # A new checkpoint marks what was computed from it stale, and nothing else: the index,
        # the user vectors, and through them the report and the submission.
        retrained = TaacConfig(data_root=str(tmp_path / "data"), synthetic={"num_users": 200, "num_items": 600, "seed": 99},
                               training={"max_steps": 6})
        assert materialize([encoder_checkpoint], partition_key="1M", resources={"taac": retrained}, instance=instance).success
        assert stale() == {(name, "1M") for name in ("faiss_index", "user_vectors", "evaluation_report", "submission")}
        assert materialize(chain[4:], partition_key="1M", resources={"taac": retrained}, instance=instance).success
        assert stale() == set()
        assert below_raw == tables | after_tables | children(after_tables)  # every level was walked
