"""One writer per track: the track lock, the run-queue limit of the local instance, and two real
runs of one track at the same time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from taac_dagster import locks
from taac_dagster.locks import HOLDER_NAME, TrackBusyError, track_lock

REPO_ROOT = Path(__file__).resolve().parents[1]


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, text: str) -> None:
        self.lines.append(text)

    warning = info


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    root = tmp_path / "1M"
    with track_lock(root, track="1M", step="warehouse_tables", run_id="run-a", timeout=0):
        holder = json.loads((root / HOLDER_NAME).read_text())
        assert holder["run_id"] == "run-a" and holder["pid"] == os.getpid()
        with pytest.raises(TrackBusyError) as refused:
            with track_lock(root, track="1M", step="raw_dataset", run_id="run-b", timeout=0):
                pass
    message = str(refused.value)
    assert "track 1M is being written by run run-a (step warehouse_tables" in message
    assert f"pid {os.getpid()}" in message and "step raw_dataset of run run-b" in message
    assert "TAAC_TRACK_LOCK_TIMEOUT" in message
    assert not (root / HOLDER_NAME).exists()  # released: nobody holds it
    with track_lock(root, track="1M", step="raw_dataset", run_id="run-b", timeout=0):
        pass


def test_a_waiting_writer_goes_on_when_the_holder_is_done(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "WAIT_REPORT_SECONDS", 0.1)
    root = tmp_path / "10M"
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with track_lock(root, track="10M", step="encoder_checkpoint", run_id="run-a", timeout=0):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    threading.Timer(0.5, release.set).start()
    log = Lines()
    with track_lock(root, track="10M", step="faiss_index", run_id="run-b", timeout=30, logger=log):
        assert json.loads((root / HOLDER_NAME).read_text())["run_id"] == "run-b"
    thread.join()
    assert any("held by run run-a (step encoder_checkpoint" in line for line in log.lines)


HOLD_AND_SLEEP = """
import sys, time
from taac_dagster.locks import track_lock
with track_lock(sys.argv[1], track="1M", step="warehouse_tables", run_id="killed-run", timeout=0):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_lock_of_a_killed_holder_is_free_at_once(tmp_path):
    """A holder killed with SIGKILL runs no clean-up: the OS lock goes with its process, so the
    next writer takes the track on its first attempt, without waiting, and names itself."""
    import signal

    root = tmp_path / "1M"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_SLEEP, str(root)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "held"  # blocks until the child holds the lock
        with pytest.raises(TrackBusyError, match="run killed-run"):
            with track_lock(root, track="1M", step="raw_dataset", timeout=0):
                pass
        assert json.loads((root / HOLDER_NAME).read_text())["pid"] == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    log = Lines()
    with track_lock(root, track="1M", step="raw_dataset", run_id="next-run", timeout=5, logger=log) as holder:
        assert json.loads((root / HOLDER_NAME).read_text()) == holder and holder["pid"] == os.getpid()
    assert log.lines == []  # taken on the first attempt: no "waiting for track" line


def test_the_lock_of_other_tracks_is_independent(tmp_path):
    with track_lock(tmp_path / "1M", track="1M", step="s", timeout=0):
        with track_lock(tmp_path / "10M", track="10M", step="s", timeout=0):
            pass


def test_local_instance_config_queues_one_run_per_track(tmp_path, monkeypatch):
    from dagster import DagsterInstance

    (tmp_path / "dagster.yaml").write_text((REPO_ROOT / "deploy" / "dagster.local.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with DagsterInstance.get() as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert limits == [{"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]
    readme = (REPO_ROOT / "README.md").read_text()
    assert "cp deploy/dagster.local.yaml .dagster_home/dagster.yaml" in readme


# --- the run lease ---------------------------------------------------------------------------------
def test_a_run_keeps_the_track_between_its_steps(tmp_path, monkeypatch):
    """A step of run A ends; until run A has ended (or its lease expired), a step of run B is
    refused (timeout 0) or waits, naming run A; A's own next step goes on at once."""
    monkeypatch.setattr(locks, "LEASE_POLL_SECONDS", 0.05)
    root, ended = tmp_path / "1M", set()
    step = lambda run, name, **kw: track_lock(  # noqa: E731
        root, track="1M", step=name, run_id=run, run_finished=lambda r: r in ended, **kw
    )
    with step("run-a", "raw_dataset", timeout=0):
        pass
    with pytest.raises(TrackBusyError, match=r"run run-a \(between its steps: it holds the track's run lease"):
        with step("run-b", "raw_dataset", timeout=0):
            pass
    with step("run-a", "warehouse_tables", timeout=0):  # the lease's own run
        pass
    lines = Lines()
    threading.Timer(0.3, lambda: ended.add("run-a")).start()
    started = time.monotonic()
    with step("run-b", "raw_dataset", timeout=30, logger=lines):
        assert time.monotonic() - started >= 0.3
        assert json.loads((root / locks.LEASE_NAME).read_text())["run_id"] == "run-b"
    assert any("waiting for track 1M: run run-a" in line for line in lines.lines)


def test_a_lease_not_renewed_in_time_expires(tmp_path):
    """A run of another instance (its status unknown here) or one that died without its status
    being updated: its lease lapses ``lease_ttl`` seconds after its last step."""
    root = tmp_path / "1M"
    unknown = lambda run_id: None  # noqa: E731
    with track_lock(root, track="1M", step="raw_dataset", run_id="elsewhere", run_finished=unknown, timeout=0):
        pass
    with pytest.raises(TrackBusyError):
        with track_lock(root, track="1M", step="raw_dataset", run_id="here", run_finished=unknown, timeout=0,
                        lease_ttl=60):
            pass
    time.sleep(0.3)
    with track_lock(root, track="1M", step="raw_dataset", run_id="here", run_finished=unknown, timeout=0,
                    lease_ttl=0.2):
        pass


# --- two real runs of one track -------------------------------------------------------------------
def _instance_home(tmp_path: Path) -> None:
    """A DAGSTER_HOME whose storage exists before the runs start: two processes creating the
    same SQLite tables at once is a race of Dagster's own, not what this test is about."""
    from dagster import DagsterInstance

    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "dagster.yaml").write_text("")
    with DagsterInstance.from_config(str(tmp_path / "home")):
        pass


def _execute(tmp_path: Path, name: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TAAC_")},
        "DAGSTER_HOME": str(tmp_path / "home"),
        "TAAC_DATA_ROOT": str(tmp_path / "data"),
        "TAAC_SYNTHETIC__NUM_USERS": "300",
        "TAAC_SYNTHETIC__NUM_ITEMS": "900",
        "TAAC_DUCKDB_THREADS": "1",
        **(extra_env or {}),
    }
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "taac_dagster.definitions",
         "-j", "taac_data", "--tags", '{"dagster/partition": "1M"}'],
        cwd=REPO_ROOT, env=env, stdout=open(tmp_path / f"{name}.log", "w"), stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
def test_two_runs_of_one_track_at_once_both_complete_one_after_the_other(tmp_path):
    """`dagster job execute` bypasses the run queue: the second run's steps wait for the lock
    and both runs complete; the data they leave is whole (checks pass on it)."""
    from taac_dagster.paths import TrackPaths
    from taac_dagster.quality import run_checks
    from taac_dagster.raw import RawManifest

    _instance_home(tmp_path)
    # Both runs are held at their first step until both wait, so that they start together.
    with track_lock(tmp_path / "data" / "1M", track="1M", step="test", run_id="starting-gate", timeout=0):
        runs = [_execute(tmp_path, "first"), _execute(tmp_path, "second")]
        deadline = time.monotonic() + 300
        while not all("held by run starting-gate" in (tmp_path / f"{n}.log").read_text() for n in ("first", "second")):
            assert time.monotonic() < deadline and all(run.poll() is None for run in runs)
            time.sleep(0.5)
    codes = [run.wait(timeout=600) for run in runs]
    logs = [(tmp_path / f"{name}.log").read_text() for name in ("first", "second")]
    assert codes == [0, 0], logs
    # One run's steps all come before the other's (the run lease): no step of one run read what
    # the other had written between two of its own steps.
    from dagster import DagsterEventType, DagsterInstance, EventRecordsFilter

    with DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        records = instance.get_event_records(EventRecordsFilter(DagsterEventType.ASSET_MATERIALIZATION))
    order = [r.event_log_entry.run_id for r in sorted(records, key=lambda r: r.event_log_entry.timestamp)]
    assert len(order) == 2 * (1 + 7 + 1)  # raw_dataset, the seven tables and the embeddings, per run
    assert order == sorted(order, key=order.index), order  # [A..., B...], never interleaved
    assert any("holds the track's run lease" in log for log in logs)
    paths = TrackPaths(tmp_path / "data", "1M")
    manifest = RawManifest.read(paths.raw_manifest)
    assert Path(manifest.root).is_relative_to(paths.raw) and Path(manifest.root).is_dir()
    outcomes = run_checks(paths.warehouse, "1M", max_history=100, sample_users=20_000)
    assert all(o.passed for o in outcomes if o.severity == "ERROR")
    assert not list(paths.root.glob(".*.tmp-*")) and not list(paths.raw.glob(".*.tmp-*"))


@pytest.mark.slow
def test_a_run_that_may_not_wait_is_refused_naming_the_holder(tmp_path):
    _instance_home(tmp_path)
    with track_lock(tmp_path / "data" / "1M", track="1M", step="encoder_checkpoint", run_id="holder-run", timeout=0):
        run = _execute(tmp_path, "refused", {"TAAC_TRACK_LOCK_TIMEOUT": "0"})
        code = run.wait(timeout=300)
    log = (tmp_path / "refused.log").read_text()
    assert code != 0
    assert "track 1M is being written by run holder-run (step encoder_checkpoint" in log, log[-3000:]
    assert not (tmp_path / "data" / "1M" / "raw_manifest.json").exists()


def test_a_file_system_without_flock_is_refused_not_soft_locked(tmp_path, monkeypatch):
    """filelock would fall back to a soft lock (a marker file a killed holder leaves behind):
    the step stops instead, saying what the data root needs."""
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(locks.LockUnsupportedError, match="does not support flock.*NFSv4"):
        with track_lock(tmp_path / "1M", track="1M", step="raw_dataset", run_id="run-a", timeout=0):
            pass
