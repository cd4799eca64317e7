"""Speed and memory of the synthetic generator.

    .venv/bin/python benchmarks/bench_generator.py --users 1000000 --items 4783154 --mean-history 91

Prints events/s, seconds, size on disk and peak RSS. The data goes to a temporary folder under
/tmp (or --out) and is deleted afterwards unless --keep is given.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
from pathlib import Path

from taac_dagster.settings import SyntheticSettings
from taac_dagster.sources.synthetic import generate_dataset


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--mean-history", type=float, default=91.06)
    parser.add_argument("--topics", type=int, default=64)
    parser.add_argument("--cold-items", type=int, default=10_000)
    parser.add_argument("--track", choices=["1M", "10M"], default="1M")
    parser.add_argument("--format", choices=["hub_parquet", "competition_jsonl"], default="hub_parquet")
    parser.add_argument("--families", type=int, nargs="*", default=[81])
    parser.add_argument("--max-embedding-dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="parent folder for the data (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = SyntheticSettings(
        num_users=args.users,
        num_items=args.items,
        num_topics=args.topics,
        mean_history=args.mean_history,
        cold_items=args.cold_items,
        max_embedding_dim=args.max_embedding_dim,
        seed=args.seed,
        format=args.format,
    )
    parent = args.out or Path("/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="bench_generator_", dir=parent))
    try:
        summary = generate_dataset(out, args.track, cfg, args.families)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(f"shape: {summary.users:,} users x {summary.items:,} items (+{summary.cold_items:,} cold), "
          f"track {summary.track}, format {summary.format}, families {summary.families}")
    print(f"events:        {summary.events:,} ({summary.clicks:,} clicks, {summary.conversions:,} conversions)")
    print(f"candidates:    {summary.candidates:,}")
    print(f"seconds:       {summary.seconds:.1f}")
    print(f"events/s:      {summary.events_per_second:,.0f}")
    print(f"size on disk:  {summary.bytes_written / 1e6:,.1f} MB")
    print(f"peak RSS:      {peak_rss_mb():,.0f} MB")
    print(f"data:          {out}" + ("" if args.keep else " (deleted)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
