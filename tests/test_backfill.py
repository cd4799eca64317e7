"""A backfill over both tracks, launched from the CLI as docs/operations.md says, on a temporary
instance served by `dagster dev` (its daemon runs the backfill): both partitions end with a
report and a submission."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.instance.ref import InstanceRef

from tests.ui_support import REPO_ROOT, DagsterDev, isolated_env, run_cli

pytestmark = pytest.mark.slow

SETTINGS = {
    "TAAC_SYNTHETIC__NUM_USERS": "300",
    "TAAC_SYNTHETIC__NUM_ITEMS": "800",
    "TAAC_TRAINING__MAX_STEPS": "15",
    "TAAC_TRAINING__VAL_USERS": "0",
    "TAAC_TRAINING__THREADS": "1",
}


def test_backfill_of_both_tracks_from_the_cli(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("")
    data = tmp_path / "data"
    env = isolated_env(home, {**SETTINGS, "TAAC_DATA_ROOT": str(data)})
    server = DagsterDev(workspace=REPO_ROOT / "workspace.yaml", env=env, cwd=REPO_ROOT, log=tmp_path / "dev.log")
    try:
        server.wait_ready()
        run_cli(
            ["job", "backfill", "-w", str(REPO_ROOT / "workspace.yaml"), "-j", "taac_main",
             "--partitions", "1M,10M", "--noprompt"],
            env=env, cwd=REPO_ROOT, log=tmp_path / "backfill.log", timeout=180,
        )
        with DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
            deadline = time.monotonic() + 600
            while True:
                backfills = instance.get_backfills()
                assert len(backfills) == 1, backfills
                runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": backfills[0].backfill_id}))
                finished = [r for r in runs if r.is_finished]
                if backfills[0].status != BulkActionStatus.REQUESTED and len(runs) == 2 and len(finished) == 2:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"backfill not done in 10 minutes: {backfills[0].status}, "
                                         f"runs {[(r.tags.get('dagster/partition'), r.status) for r in runs]}")
                time.sleep(2)
            assert backfills[0].status == BulkActionStatus.COMPLETED
            assert sorted(r.tags["dagster/partition"] for r in runs) == ["10M", "1M"]
            assert all(r.status == DagsterRunStatus.SUCCESS for r in runs), [(r.run_id, r.status) for r in runs]
            for key in ("evaluation_report", "submission", "faiss_index"):
                assert instance.get_materialized_partitions(AssetKey(key)) == {"1M", "10M"}, key
    finally:
        server.stop()
    for track in ("1M", "10M"):
        figures = json.loads((data / track / "reports" / "evaluation.json").read_text())
        assert figures["track"] == track and figures["methods"]["model"]["users"] > 0
        assert Path(data / track / "reports" / "submission.json").stat().st_size > 0
