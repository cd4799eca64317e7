"""Atomic artifacts: flushed to disk before the rename that publishes them; the clean-up of
leftovers removes only temporaries whose writer is gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from taac_dagster.atomic import atomic_dir, atomic_file, remove_stale_temps, temp_sibling


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_clean_up_spares_a_live_writers_temporaries(tmp_path):
    live = temp_sibling(tmp_path / "warehouse.duckdb", ".duckdb")  # this process: alive
    live.write_bytes(b"being written")
    dead = Path(str(live).replace(f"-{os.getpid()}-", f"-{_dead_pid()}-"))
    dead.write_bytes(b"abandoned")
    legacy = tmp_path / ".embeddings.tmp-deadbeef"  # written before temporaries named their writer
    legacy.mkdir()
    foreign = tmp_path / ".raw.tmp-otherhost-123-abcdef12"  # another machine, just written
    foreign.mkdir()
    assert remove_stale_temps(tmp_path) == 2
    assert live.exists() and foreign.exists() and not dead.exists() and not legacy.exists()


def _record_durability(monkeypatch) -> list[tuple[str, str]]:
    """(operation, path) of every fsync and rename, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, target):
        events.append(("replace", str(source)))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name file descriptors")
def test_artifacts_are_flushed_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    events = _record_durability(monkeypatch)
    target = tmp_path / "report.json"
    with atomic_file(target) as tmp:
        tmp.write_text("{}")
    assert events.index(("fsync", str(tmp))) < events.index(("replace", str(tmp)))
    assert events[-1] == ("fsync", str(tmp_path))  # the rename itself, flushed

    events.clear()
    with atomic_dir(tmp_path / "index") as folder:
        (folder / "index.faiss").write_bytes(b"x")
    flushed = [path for op, path in events if op == "fsync"]
    renamed = next(i for i, (op, path) in enumerate(events) if op == "replace" and path == str(folder))
    assert events.index(("fsync", str(folder / "index.faiss"))) < renamed
    assert events.index(("fsync", str(folder))) < renamed
    assert flushed[-1] == str(tmp_path)


def test_only_the_newest_rejected_builds_are_kept(tmp_path):
    """rejected/ keeps the N newest builds, each a database and its embeddings folder sharing
    one stamp, so a track that keeps failing its checks does not fill the disk."""
    from taac_dagster.atomic import keep_newest

    stamps = ["20261201T100000Z-7", "20261203T090000Z-12", "20261202T235959Z-3", "20261203T090000Z-13"]
    for stamp in stamps:
        (tmp_path / f"warehouse-{stamp}.duckdb").write_text("db")
        (tmp_path / f"embeddings-{stamp}").mkdir()
    (tmp_path / "default-20261130T000000Z").mkdir()  # an index set aside: same rule
    (tmp_path / "notes.txt").write_text("not a build")
    assert keep_newest(tmp_path, 2) == 2 * 2 + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "embeddings-20261203T090000Z-12", "embeddings-20261203T090000Z-13", "notes.txt",
        "warehouse-20261203T090000Z-12.duckdb", "warehouse-20261203T090000Z-13.duckdb",
    ]
    assert keep_newest(tmp_path, 0) == 4 and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
