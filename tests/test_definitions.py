from __future__ import annotations

from pathlib import Path

from dagster import AssetKey, Definitions

from taac_dagster.definitions import defs
from taac_dagster.partitions import track_partitions


def test_definitions_load():
    Definitions.validate_loadable(defs)
    jobs = {job.name for job in defs.resolve_all_job_defs()}
    assert {"taac_main", "taac_data"} <= jobs


def test_every_asset_is_partitioned_by_track_and_versioned():
    graph = defs.resolve_asset_graph()
    keys = list(graph.get_all_asset_keys())
    assert AssetKey("raw_dataset") in keys and AssetKey("sequences") in keys
    for key in keys:
        node = graph.get(key)
        assert node.partitions_def == track_partitions, key
        assert node.code_version, f"{key} has no code_version"
    assert track_partitions.get_partition_keys() == ["1M", "10M"]


def test_quality_checks_are_blocking_where_they_guard_data():
    checks = {}
    for assets_def in defs.resolve_asset_graph().assets_defs:
        for spec in assets_def.check_specs:
            checks[spec.name] = spec
    assert checks["events_valid"].blocking and checks["sequences_valid"].blocking
    assert not checks["events_missing_action_types"].blocking
    assert checks["index_recall_at_10"].blocking
    assert not checks["semantic_ids_content_coverage"].blocking  # low coverage: collaborative codes
    assert len(checks) == 10


def test_every_job_has_a_maximum_run_time_that_the_instance_enforces():
    """A hung step must not hold its track for good: each job carries dagster/max_runtime and the
    local instance config turns on the run monitoring that acts on it."""
    import yaml

    for job in defs.resolve_all_job_defs():
        if job.name.startswith("__"):
            continue
        assert int(job.tags["dagster/max_runtime"]) >= 3600, job.name
    instance = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "dagster.local.yaml").read_text())
    assert instance["run_monitoring"]["enabled"] is True
