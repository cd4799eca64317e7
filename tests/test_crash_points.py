"""A kill at any instant of a publish leaves a state a reader can trust.

Each test runs the writer in a child process that SIGKILLs itself right before or right after
the N-th rename, exchange or fsync it performs, once per point (the points are counted by a
first run that kills nothing). After each kill a reader sees the complete previous state or the
complete new one, and the next writer (after the clean-up every step runs under its track
lock) ends in the new state with nothing left over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from taac_dagster.atomic import atomic_dir, recover_interrupted_writes
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import load_settings
from taac_dagster.warehouse import build_warehouse

from .conftest import write_tiny_hub

REPO = Path(__file__).resolve().parents[1]

# Installed in the child before the writer runs: every rename, exchange and fsync is a point.
KILL_HARNESS = """
import json, os, signal, sys
import taac_dagster.atomic as atomic

points = []
kill_at, when = int(os.environ["KILL_AT"]), os.environ["KILL_WHEN"]

def counted(name, function):
    def call(*args, **kwargs):
        points.append(name)
        if len(points) == kill_at and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = function(*args, **kwargs)
        if len(points) == kill_at and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return call

os.replace = counted("replace", os.replace)
os.rename = counted("rename", os.rename)
os.fsync = counted("fsync", os.fsync)
if os.environ.get("NO_EXCHANGE"):  # a file system without an atomic exchange (NFS, macOS)
    atomic.exchange_paths = lambda first, second: False
else:
    atomic.exchange_paths = counted("exchange", atomic.exchange_paths)
"""

WAREHOUSE_WRITER = """
from pathlib import Path
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import load_settings
from taac_dagster.warehouse import build_warehouse
settings = load_settings("10M", {"data_root": sys.argv[1], "embedding_families": [81]})
build_warehouse(Path(sys.argv[2]), TrackPaths(settings.data_root, "10M"), settings)
print(json.dumps(points))
"""

FOLDER_WRITER = """
from pathlib import Path
with atomic.atomic_dir(Path(sys.argv[1])) as tmp:
    for name in ("a", "b", "c"):
        (tmp / name).write_text("new")
print(json.dumps(points))
"""


def run_writer(code: str, *args: str, kill_at: int = 0, when: str = "before", exchange: bool = True) -> tuple[int, list]:
    env = {**os.environ, "KILL_AT": str(kill_at), "KILL_WHEN": when, "NO_EXCHANGE": "" if exchange else "1"}
    done = subprocess.run([sys.executable, "-c", KILL_HARNESS + code, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    points = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else []
    assert done.returncode in (0, -9), done.stderr[-2000:]
    return done.returncode, points


def warehouse_view(root: Path) -> tuple[int, int, int, int]:
    """What a reader sees: the database's embedding dim and rows, and those of the file it names
    (a missing or mismatched file fails here)."""
    con = duckdb.connect(str(root / "warehouse.duckdb"), read_only=True)
    try:
        [(dim, count, path)] = con.execute("SELECT dim, rows, path FROM embedding_families").fetchall()
    finally:
        con.close()
    table = pq.read_table(path)
    return dim, count, len(table.column("emb")[0]), table.num_rows


def test_a_warehouse_publish_killed_at_any_point_leaves_the_old_or_the_new_pair(tmp_path):
    """The database names its embeddings folder (embeddings/build-<id>) and its rename is the
    one commit point: killed anywhere, the reader sees the 4-d pair or the 8-d one, never the
    old database beside the new vectors; the next build collects what the kill left."""
    old, new = write_tiny_hub(tmp_path / "old", emb_dim=4), write_tiny_hub(tmp_path / "new", emb_dim=8)
    settings = load_settings("10M", {"data_root": str(tmp_path / "data"), "embedding_families": [81]})
    paths = TrackPaths(settings.data_root, "10M")
    build_warehouse(old, paths, settings)
    code, points = run_writer(WAREHOUSE_WRITER, str(tmp_path / "data"), str(new))
    assert code == 0 and points.count("replace") >= 2 and "fsync" in points
    assert warehouse_view(paths.root) == (8, 6, 8, 6)
    outcomes = {}
    for kill_at in range(1, len(points) + 1):
        for when in ("before", "after"):
            build_warehouse(old, paths, settings)
            assert warehouse_view(paths.root) == (4, 6, 4, 6)
            code, _ = run_writer(WAREHOUSE_WRITER, str(tmp_path / "data"), str(new), kill_at=kill_at, when=when)
            assert code == -9
            seen = warehouse_view(paths.root)
            assert seen in ((4, 6, 4, 6), (8, 6, 8, 6)), (kill_at, when, points[kill_at - 1], seen)
            outcomes[(kill_at, when)] = seen[0]
            recover_interrupted_writes(paths.root)
            assert warehouse_view(paths.root) == seen  # the clean-up never changes what a reader sees
            build_warehouse(new, paths, settings)
            assert warehouse_view(paths.root) == (8, 6, 8, 6)
            assert sorted(p.name for p in paths.root.iterdir()) == ["embeddings", "warehouse.duckdb"]
            assert len(list(paths.embeddings.iterdir())) == 1  # only the build the database reads
    # The switch happens at the database's rename, not before and not after.
    commit = max(i for i, name in enumerate(points, 1) if name == "replace")
    assert outcomes[(commit, "before")] == 4 and outcomes[(commit, "after")] == 8


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_folder_replaced_atomically_is_never_half_written(tmp_path, exchange):
    """atomic_dir swaps a folder in one exchange (Linux): killed anywhere, the target is the
    complete old or new folder. Where the file system cannot exchange, it is missing for an
    instant between two renames, and the clean-up under the next writer's lock puts the old
    folder back."""
    target = tmp_path / "artifact"

    def publish_old() -> None:
        with atomic_dir(target) as tmp:
            for name in ("a", "b"):
                (tmp / name).write_text("old")

    def contents() -> dict[str, str] | None:
        return {p.name: p.read_text() for p in target.iterdir()} if target.exists() else None

    publish_old()
    code, points = run_writer(FOLDER_WRITER, str(target), exchange=exchange)
    assert code == 0 and contents() == {"a": "new", "b": "new", "c": "new"}
    missing_seen = 0
    for kill_at in range(1, len(points) + 1):
        for when in ("before", "after"):
            publish_old()
            run_writer(FOLDER_WRITER, str(target), kill_at=kill_at, when=when, exchange=exchange)
            seen = contents()
            missing_seen += seen is None
            if exchange:
                assert seen is not None
            recover_interrupted_writes(tmp_path)
            assert contents() in ({"a": "old", "b": "old"}, {"a": "new", "b": "new", "c": "new"}), (kill_at, when)
            assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    assert ("exchange" in points) == exchange and (missing_seen > 0) == (not exchange)


SEMANTIC_ID_WRITER = """
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import load_settings
import taac_dagster.steps.semantic_ids as sid
from taac_dagster.steps.semantic_ids import build_semantic_ids
# The table's transaction runs inside DuckDB: its call is a point too (before: not committed).
sid.write_item_semantic_ids = counted("commit", sid.write_item_semantic_ids)
settings = load_settings("10M", {"data_root": sys.argv[1],
                                 "semantic_ids": {"codebook_size": 2, "min_items": 2, "levels": int(sys.argv[2])}})
build_semantic_ids(TrackPaths(settings.data_root, "10M"), settings)
print(json.dumps(points))
"""

RAW_WRITER = """
from taac_dagster.paths import TrackPaths
from taac_dagster.raw import materialize_raw
from taac_dagster.settings import load_settings
settings = load_settings("1M", {"data_root": sys.argv[1], "synthetic": {"num_users": 60, "num_items": 200,
                                                                           "seed": int(sys.argv[2])}})
materialize_raw(settings, TrackPaths(settings.data_root, "1M"))
print(json.dumps(points))
"""


def test_semantic_ids_killed_at_any_point_train_on_one_build(tmp_path):
    """The codebooks folder, then the table with its description (the commit point): killed
    anywhere, the arrays training reads carry the levels of the codes in the table, of the
    old build (2 levels) or the new one (3)."""
    from taac_dagster.steps.arrays import PrepareOptions, prepare_arrays
    from taac_dagster.steps.semantic_ids import build_semantic_ids

    def settings(levels: int):
        return load_settings("10M", {"data_root": str(tmp_path / "data"),
                                     "semantic_ids": {"codebook_size": 2, "min_items": 2, "levels": levels}})

    paths = TrackPaths(tmp_path / "data", "10M")
    build_warehouse(write_tiny_hub(tmp_path / "hub"), paths, settings(2))

    def levels_trained_on() -> int:
        arrays = prepare_arrays(paths.warehouse, tmp_path / "arrays", "10M", PrepareOptions(val_users=1),
                                codebooks_json=paths.codebooks / "codebooks.json", reuse=False)
        con = duckdb.connect(str(paths.warehouse), read_only=True)
        [(width,)] = con.execute("SELECT DISTINCT len(codes) FROM item_semantic_ids").fetchall()
        con.close()
        assert arrays.meta["sid_levels"] == width - 1 == arrays.meta["codebooks"]["levels"]
        return width - 1

    build_semantic_ids(paths, settings(2))
    code, points = run_writer(SEMANTIC_ID_WRITER, str(tmp_path / "data"), "3")
    assert code == 0 and "exchange" in points and points[-1] == "commit" and levels_trained_on() == 3
    seen = {}
    for kill_at in range(1, len(points) + 1):
        for when in ("before", "after"):
            build_semantic_ids(paths, settings(2))
            run_writer(SEMANTIC_ID_WRITER, str(tmp_path / "data"), "3", kill_at=kill_at, when=when)
            recover_interrupted_writes(paths.root)
            seen[(points[kill_at - 1], when)] = levels_trained_on()
    # The new build counts from the table's commit on, whatever the codebooks folder holds.
    assert seen.pop(("commit", "after")) == 3 and set(seen.values()) == {2}


def test_raw_data_killed_at_any_point_is_the_old_or_the_new_dataset(tmp_path):
    """The generated dataset (one folder exchange), then its manifest (one replace): killed at
    any rename or exchange (the fsyncs between them are covered by the tests above), the
    manifest describes the files that are there, of the old seed or the new one, or, killed
    between the two, the warehouse refuses the files as changed since the manifest."""
    from taac_dagster.errors import RawDataChangedError
    from taac_dagster.raw import RawManifest, materialize_raw, verify_raw_files

    data = str(tmp_path / "data")
    paths = TrackPaths(tmp_path / "data", "1M")

    def generate(seed: int) -> str:
        settings = load_settings("1M", {"data_root": data, "synthetic": {"num_users": 60, "num_items": 200, "seed": seed}})
        return materialize_raw(settings, paths).digest

    first = generate(1)
    code, points = run_writer(RAW_WRITER, data, "2")
    second = RawManifest.read(paths.raw_manifest).digest
    assert code == 0 and first != second and points.count("exchange") == 1
    exchange = points.index("exchange") + 1
    outcomes = {}
    for kill_at in [i for i, name in enumerate(points, 1) if name != "fsync"]:
        for when in ("before", "after"):
            generate(1)
            run_writer(RAW_WRITER, data, "2", kill_at=kill_at, when=when)
            recover_interrupted_writes(paths.root)
            manifest = RawManifest.read(paths.raw_manifest)
            folder_is_new = kill_at > exchange or (kill_at == exchange and when == "after")
            if manifest.digest == first and folder_is_new:
                with pytest.raises(RawDataChangedError):
                    verify_raw_files(manifest, paths.raw_manifest)
                outcomes[(points[kill_at - 1], kill_at, when)] = "refused"
                continue
            verify_raw_files(manifest, paths.raw_manifest)
            outcomes[(points[kill_at - 1], kill_at, when)] = "new" if manifest.digest == second else "old"
    assert outcomes[("exchange", exchange, "before")] == "old"
    assert outcomes[("exchange", exchange, "after")] == "refused"
    assert outcomes[max(outcomes)] in ("new", "refused") and "new" in outcomes.values()


CHECKPOINT_WRITER = """
import torch
from pathlib import Path
from taac_dagster.steps.publish import publish_file
state = {"step": 2, "model": {"w": torch.full((64, 64), 2.0)}}
publish_file(Path(sys.argv[1]), lambda target: torch.save(state, target))  # the trainer's checkpoint write
print(json.dumps(points))
"""


def test_a_checkpoint_killed_at_any_point_is_the_old_or_the_new_one(tmp_path):
    """Checkpoints (and every file the steps publish: reports, the submission, manifests) are
    written to a temporary sibling, flushed, and renamed over the target: killed at any point,
    torch.load reads the complete old checkpoint or the complete new one, and the next writer's
    clean-up removes the temporary."""
    import torch

    from taac_dagster.steps.publish import publish_file

    target = tmp_path / "last.pt"

    def save_checkpoint(path, state):  # what the trainer does with the writer the step hands in
        publish_file(path, lambda file: torch.save(state, file))

    def seen() -> tuple[int, float]:
        state = torch.load(target, weights_only=True)
        return state["step"], float(state["model"]["w"].sum())

    save_checkpoint(target, {"step": 1, "model": {"w": torch.ones(64, 64)}})
    code, points = run_writer(CHECKPOINT_WRITER, str(target))
    assert code == 0 and seen() == (2, 2.0 * 64 * 64) and "replace" in points and "fsync" in points
    outcomes = []
    for kill_at in range(1, len(points) + 1):
        for when in ("before", "after"):
            save_checkpoint(target, {"step": 1, "model": {"w": torch.ones(64, 64)}})
            assert run_writer(CHECKPOINT_WRITER, str(target), kill_at=kill_at, when=when)[0] == -9
            outcomes.append(seen())
            recover_interrupted_writes(tmp_path)
            assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert set(outcomes) == {(1, 64.0 * 64), (2, 2.0 * 64 * 64)}
    replace = points.index("replace")
    assert outcomes[2 * replace] == (1, 64.0 * 64) and outcomes[2 * replace + 1] == (2, 2.0 * 64 * 64)
