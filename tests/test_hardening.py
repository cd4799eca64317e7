"""Hardening: paths and settings never become SQL text, every DuckDB connection carries the
memory and thread settings, and the Hub token stays secret."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from pydantic import ValidationError

from taac_dagster.paths import TrackPaths
from taac_dagster.quality import run_checks
from taac_dagster.settings import load_settings
from taac_dagster.warehouse import build_checked_warehouse


@pytest.mark.slow  # a full checked warehouse build (~10 s here)
def test_a_data_root_with_a_quote_builds_and_checks(demo_dir, tmp_path):
    root = tmp_path / "it's [the] data"
    settings = load_settings("1M", {"data_root": str(root)})
    paths = TrackPaths(settings.data_root, "1M")
    summary, outcomes = build_checked_warehouse(demo_dir, paths, settings)
    assert summary.path == paths.warehouse and paths.warehouse.is_file()
    assert all(o.passed for o in outcomes if o.severity == "ERROR")
    con = duckdb.connect(str(paths.warehouse), read_only=True)
    [(path,)] = con.execute("SELECT path FROM embedding_families").fetchall()
    assert Path(path).is_file() and Path(path).parent.parent == paths.embeddings


@pytest.mark.parametrize("value", ["8GB'; SET threads = 64; --", "lots", "8 GB extra", ""])
def test_the_duckdb_memory_limit_is_validated(value):
    with pytest.raises(ValidationError, match="duckdb_memory_limit"):
        load_settings("1M", {"duckdb_memory_limit": value})


@pytest.mark.parametrize("value", ["8GB", "512MiB", "1.5GiB", "50%", "300 MB"])
def test_memory_limits_duckdb_accepts_are_accepted(value):
    assert load_settings("1M", {"duckdb_memory_limit": value}).duckdb_memory_limit == value.strip()


@pytest.mark.slow  # a full checked warehouse build (~7 s here)
def test_every_connection_of_the_data_stage_carries_the_settings(demo_dir, tmp_path, monkeypatch):
    """DuckDB's own default is 80% of RAM per connection; the build, its checks and the
    diagnosis of a failed check each open connections, all with the configured limit."""
    opened: list[dict] = []
    real_connect = duckdb.connect

    def recording_connect(database=":memory:", read_only=False, config=None, **kwargs):
        opened.append(dict(config or {}))
        return real_connect(database, read_only=read_only, config=config or {}, **kwargs)

    monkeypatch.setattr(duckdb, "connect", recording_connect)
    settings = load_settings("1M", {"data_root": str(tmp_path / "data"), "duckdb_memory_limit": "700MB", "duckdb_threads": 1})
    paths = TrackPaths(settings.data_root, "1M")
    build_checked_warehouse(demo_dir, paths, settings)
    run_checks(paths.warehouse, "1M", max_history=100, sample_users=20_000, settings=settings)
    assert len(opened) >= 3
    assert all(config.get("memory_limit") == "700MB" and config.get("threads") == 1 for config in opened), opened


def test_the_hub_token_is_a_secret(monkeypatch, tmp_path):
    import taac_dagster.sources.hub as hub
    from taac_dagster.raw import materialize_raw

    monkeypatch.setenv("TAAC_HUB_TOKEN", "hf_very_secret")
    settings = load_settings("1M", {"data_root": str(tmp_path), "source": "hub", "hub_repo_id": "TAAC2025/TencentGR-1M"})
    assert "hf_very_secret" not in repr(settings) and "hf_very_secret" not in settings.model_dump_json()
    assert settings.hub_token.get_secret_value() == "hf_very_secret"
    seen = {}

    def fake_download(repo_id, revision, local_dir, families, *, token=None, **kwargs):
        seen["token"] = token
        raise RuntimeError("stop here")

    monkeypatch.setattr(hub, "download_hub_dataset", fake_download)
    with pytest.raises(RuntimeError, match="stop here"):
        materialize_raw(settings, TrackPaths(tmp_path, "1M"))
    assert seen["token"] == "hf_very_secret"  # the plain value reaches huggingface_hub only
