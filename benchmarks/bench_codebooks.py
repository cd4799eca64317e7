"""Speed and memory of the RQ-KMeans Semantic ID build (models/semantic_ids.py, taac_dagster/steps/semantic_ids.py).

    .venv/bin/python benchmarks/bench_codebooks.py                 # the two default cases
    .venv/bin/python benchmarks/bench_codebooks.py --items 660000 --dim 4096 --whiten pca

Default cases (each in its own process, so the peak RSS is that case's):
  1M items x 32-d (family 81) and 660K items x 4096-d (family 84, the largest family), both
  3 levels x K=256, training on the default 100K-point subsample.

Vectors are random but clustered, with a low intrinsic dimension like real embeddings (see
``clustered``).

The collaborative path (codes from the training sequences, when content coverage is too low):

    .venv/bin/python benchmarks/bench_codebooks.py --collaborative --users 1000000 --items 1000000

generates a synthetic dataset of that shape and builds its warehouse (in a child process, not
timed; ``--data-root`` keeps and reuses it), then times ``build_semantic_ids`` with
``TAAC_SEMANTIC_IDS__SOURCE=collaborative`` end to end (sequences read from DuckDB,
co-occurrence, PPMI + SVD, fold-in, RQ-KMeans, table write) and prints its phases, the peak
RSS and how well the level-1 codes recover the generator's planted topics.
Prints the time to fit (PCA + k-means per level), encode every item, and resolve collisions
(the disambiguation level), the figures the asset reports, and the peak RSS. Data generation
is not timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from models.semantic_id_collisions import collision_rate, resolve_collisions
from models.semantic_id_quality import reconstruction_error, utilization
from models.semantic_ids import SemanticIdConfig, encode_with_errors, fit_rq_kmeans

DEFAULT_CASES = [(1_000_000, 32), (660_000, 4096)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def clustered(n: int, dim: int, topics: int, seed: int, latent: int = 64) -> np.ndarray:
    """float32 [n, dim], shaped like real embeddings: low intrinsic dimension.

    Items are unit topic centres plus noise of norm ~1 in a ``latent``-d space, mapped to
    ``dim`` by a fixed random projection, plus a little isotropic noise (norm ~0.1). Written
    in place, chunk by chunk, so the matrix is the only large allocation.
    """
    rng = np.random.default_rng(seed)
    latent = min(latent, dim)
    centres = rng.standard_normal((topics, latent), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    projection = None
    if dim > latent:
        projection = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(np.float32)  # orthonormal rows
    out = np.empty((n, dim), np.float32)
    step = max(1, (1 << 24) // dim)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        z = centres[rng.integers(0, topics, hi - lo)]
        z += rng.standard_normal((hi - lo, latent), dtype=np.float32) / np.float32(np.sqrt(latent))
        out[lo:hi] = z if projection is None else z @ projection
        out[lo:hi] += rng.standard_normal((hi - lo, dim), dtype=np.float32) * np.float32(0.1 / np.sqrt(dim))
    return out


def run_case(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    x = clustered(args.items, args.dim, args.topics, args.seed)
    generated = time.perf_counter() - started
    rss_data = peak_rss_mb()
    cfg = SemanticIdConfig(
        levels=args.levels, codebook_size=args.codebook_size, whiten=args.whiten, whiten_dim=args.whiten_dim,
        niter=args.niter, seed=args.seed, max_train_points=args.max_train_points,
    )
    t0 = time.perf_counter()
    books = fit_rq_kmeans(x, cfg)
    t1 = time.perf_counter()
    encoded = encode_with_errors(books, x)
    t2 = time.perf_counter()
    ids = np.arange(len(x), dtype=np.int64)
    rank = resolve_collisions(encoded.codes, encoded.level_sq_error[:, -1], ids)
    t3 = time.perf_counter()
    before = collision_rate(encoded.codes)
    after = collision_rate(np.concatenate([encoded.codes, rank[:, None]], axis=1))
    return {
        "items": args.items,
        "dim": args.dim,
        "levels": args.levels,
        "K": books.codebook_size,
        "whiten": args.whiten if args.whiten == "none" else f"pca->{books.dim}",
        "train_points": min(args.items, args.max_train_points),
        "seconds_fit": round(t1 - t0, 1),
        "seconds_encode": round(t2 - t1, 1),
        "seconds_collisions": round(t3 - t2, 2),
        "seconds_total": round(t3 - t0, 1),
        "items_per_second_encode": round(args.items / (t2 - t1)),
        "utilization": [round(u, 3) for u in utilization(encoded.codes, books.codebook_size)],
        "reconstruction_error": [round(e, 3) for e in reconstruction_error(encoded)],
        "collision_rate_before": round(before, 4),
        "collision_rate_after": after,
        "max_disambiguation": int(rank.max()),
        "data_gb": round(x.nbytes / 1e9, 2),
        "peak_rss_mb_after_data": round(rss_data),
        "peak_rss_mb": round(peak_rss_mb()),
        "seconds_generate_untimed": round(generated, 1),
    }


def _collaborative_settings(args: argparse.Namespace, data_root: str):
    from taac_dagster.settings import load_settings

    return load_settings(
        "1M",
        {
            "data_root": data_root,
            "synthetic": {"num_users": args.users, "num_items": args.items, "mean_history": args.mean_history},
            "semantic_ids": {
                "source": "collaborative", "seed": args.seed, "collaborative_max_items": args.max_items,
                "collaborative_window": args.window, "collaborative_dim": args.collaborative_dim,
            },
        },
    )


def build_dataset(args: argparse.Namespace, data_root: str) -> dict:
    """Synthetic raw data and its warehouse (the benchmark's input, not timed with it)."""
    from taac_dagster.paths import TrackPaths
    from taac_dagster.raw import materialize_raw
    from taac_dagster.warehouse import build_warehouse

    settings = _collaborative_settings(args, data_root)
    paths = TrackPaths(settings.data_root, "1M")
    started = time.perf_counter()
    manifest = materialize_raw(settings, paths)
    summary = build_warehouse(Path(manifest.root), paths, settings)
    return {"seconds": round(time.perf_counter() - started, 1), "events": summary.row_counts["events"]}


def run_collaborative(args: argparse.Namespace, data_root: str) -> dict:
    from taac_dagster.paths import TrackPaths
    from taac_dagster.steps.semantic_ids import build_semantic_ids

    settings = _collaborative_settings(args, data_root)
    started = time.perf_counter()
    result = build_semantic_ids(TrackPaths(settings.data_root, "1M"), settings)
    total = time.perf_counter() - started
    metrics = result.metrics
    return {
        "users": args.users,
        "items": args.items,
        "source": result.source,
        "seconds_total": round(total, 1),
        "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
        "collaborative": metrics["collaborative"],
        "items_coded": metrics["items"],
        "items_with_vector": metrics["items_with_embedding"],
        "K": metrics["codebook_size"],
        "collision_rate_before": metrics["collision_rate_before"],
        "topic_recovery": metrics.get("topic_recovery"),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def collaborative_main(args: argparse.Namespace) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_codebooks_") as scratch:
        data_root = args.data_root or scratch
        warehouse = Path(data_root) / "1M" / "warehouse.duckdb"
        if not warehouse.is_file():
            print(f"building a {args.users:,}-user dataset under {data_root} (not timed)", flush=True)
            built = subprocess.run(
                [sys.executable, __file__, "--build-dataset", "--data-root", data_root, *_scale_flags(args)],
                check=False, capture_output=True, text=True,
            )
            if built.returncode:
                print(built.stdout + built.stderr, flush=True)
                return built.returncode
            print(built.stdout.strip().splitlines()[-1], flush=True)
        print(json.dumps(run_collaborative(args, data_root)), flush=True)
    return 0


def _scale_flags(args: argparse.Namespace) -> list[str]:
    return ["--users", str(args.users), "--items", str(args.items), "--mean-history", str(args.mean_history)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=None, help="one case: this many items (with --dim)")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--whiten", choices=["none", "pca"], default="none")
    parser.add_argument("--whiten-dim", type=int, default=None)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--max-train-points", type=int, default=100_000)
    parser.add_argument("--topics", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--collaborative", action="store_true", help="time the collaborative path (see above)")
    parser.add_argument("--users", type=int, default=1_000_000, help="collaborative: synthetic users")
    parser.add_argument("--mean-history", type=float, default=91.0, help="collaborative: events per user (real 1M: 91)")
    parser.add_argument("--data-root", default=None, help="collaborative: keep / reuse the dataset here")
    parser.add_argument("--max-items", type=int, default=100_000, help="collaborative: items in the SVD")
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--collaborative-dim", type=int, default=32)
    parser.add_argument("--build-dataset", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_dataset or args.collaborative:
        args.items = args.items or 1_000_000
        if args.build_dataset:
            print(json.dumps(build_dataset(args, args.data_root)), flush=True)
            return 0
        return collaborative_main(args)
    if args.items is not None or args.dim is not None:
        args.items = args.items or 1_000_000
        args.dim = args.dim or 32
        print(json.dumps(run_case(args)), flush=True)
        return 0
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for items, dim in DEFAULT_CASES:
        print(f"--- {items:,} items x {dim}-d", flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--items", str(items), "--dim", str(dim), *passthrough], check=False
        )
        if done.returncode:
            print(f"case {items} x {dim} failed with exit code {done.returncode}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
