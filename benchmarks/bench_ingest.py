"""Ingest speed and peak memory: our readers next to a bare DuckDB unnest of the same files.

For each format (Hub parquet, competition JSONL) a synthetic dataset of the chosen shape is
generated once, then, in fresh subprocesses so peak memory is per step:

- ``bare``: DuckDB reads the sequence files and unnests every event (user, item, action,
  timestamp) into a table: the floor any reader pays;
- ``events``: our reader stages the same sequence files and builds the ``events`` table from
  ``sql/events.sql`` (for JSONL the one parse also yields user profiles and item features);
- ``warehouse``: the full warehouse build (every table in sql/, embeddings).

The figure is events/s relative to bare (target >= 0.7 for ``events``). Peak memory is the
child's VmHWM (a child's ru_maxrss would include the parent's, which generated the data).

    python benchmarks/bench_ingest.py --users 1000000 --items 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE_SQL = {
    "hub_parquet": """CREATE TABLE bare AS SELECT user_id, ev.item_id, ev.action_type, ev.timestamp
        FROM (SELECT user_id, unnest(seq) AS ev FROM read_parquet('{root}/seq/*.parquet'))""",
    "competition_jsonl": """CREATE TABLE bare AS SELECT
            (rec->>'$[0]')::BIGINT AS user_id, (rec->>'$[1]')::BIGINT AS item_id,
            (rec->>'$[4]')::INTEGER AS action_type, (rec->>'$[5]')::BIGINT AS timestamp
        FROM (SELECT unnest(CAST(json AS JSON[])) AS rec FROM read_ndjson_objects('{root}/seq.jsonl'))""",
}


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(step: str, root: str, fmt: str, work: str) -> None:
    import duckdb

    from taac_dagster.paths import TrackPaths
    from taac_dagster.settings import load_settings
    from taac_dagster.warehouse import build_warehouse, connect_warehouse

    settings = load_settings("1M", {"data_root": work, "source": "local", "local_path": root})
    db = Path(work) / f"{step}.duckdb"
    started = time.perf_counter()
    if step == "bare":
        con = duckdb.connect(str(db))
        con.execute(BARE_SQL[fmt].format(root=root))
        events = con.execute("SELECT count(*) FROM bare").fetchall()[0][0]
    elif step == "events":
        from taac_dagster.readers.hub_parquet import stage_seq
        from taac_dagster.readers.jsonl import stage_seq_jsonl
        from taac_dagster.sql import load_sql
        from taac_dagster.warehouse import table_params

        con = connect_warehouse(db, settings)
        if fmt == "hub_parquet":
            stage_seq(con, Path(root) / "seq")
        else:
            stage_seq_jsonl(con, Path(root) / "seq.jsonl")
        con.execute(load_sql("events", **table_params("1M", settings)))
        events = con.execute("SELECT count(*) FROM events").fetchall()[0][0]
    else:
        summary = build_warehouse(Path(root), TrackPaths(work, "1M"), settings)
        events = summary.row_counts["events"]
    seconds = time.perf_counter() - started
    peak_mb = _peak_rss_mb()
    print(json.dumps({"step": step, "events": events, "seconds": seconds, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--mean-history", type=float, default=91.0)
    parser.add_argument("--formats", default="hub_parquet,competition_jsonl")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return

    from taac_dagster.settings import SyntheticSettings
    from taac_dagster.sources.synthetic import generate_dataset

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_ingest_"))
    try:
        for fmt in args.formats.split(","):
            root = work / f"data_{fmt}"
            root.mkdir(parents=True, exist_ok=True)
            cfg = SyntheticSettings(
                num_users=args.users, num_items=args.items, mean_history=args.mean_history, seed=7, format=fmt,
                cold_items=1000,
            )
            started = time.perf_counter()
            summary = generate_dataset(root, "1M", cfg, [81])
            size_mb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
            seconds = time.perf_counter() - started
            print(f"[{fmt}] generated {summary.events:,} events in {seconds:.1f}s, {size_mb:,.0f} MB on disk")
            results = {}
            for step in ("bare", "events", "warehouse"):
                scratch = work / f"scratch_{fmt}_{step}"
                scratch.mkdir()
                out = subprocess.run(
                    [sys.executable, __file__, "--child", step, str(root), fmt, str(scratch)],
                    check=True, capture_output=True, text=True,
                )
                results[step] = json.loads(out.stdout.strip().splitlines()[-1])
                shutil.rmtree(scratch)
                r = results[step]
                print(
                    f"[{fmt}] {step:9s} {r['events']:>12,} events {r['seconds']:8.1f}s "
                    f"{r['events'] / r['seconds']:>14,.0f} events/s  peak RSS {r['peak_rss_mb']:,.0f} MB"
                )
            bare = results["bare"]["events"] / results["bare"]["seconds"]
            for step in ("events", "warehouse"):
                rate = results[step]["events"] / results[step]["seconds"]
                print(f"[{fmt}] {step} / bare DuckDB = {rate / bare:.2f}")
            shutil.rmtree(root)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
