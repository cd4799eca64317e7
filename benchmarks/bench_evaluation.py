"""The whole evaluation path on a generated track: encode every holdout history, search the
index, score the model, popularity and the oracle (taac_dagster/steps/), and the submission.

    .venv/bin/python benchmarks/bench_evaluation.py                         # 20K users, 90-event histories, default preset
    .venv/bin/python benchmarks/bench_evaluation.py --users 50000 --items 100000 --presets baseline,default

Per preset: a few training steps (the weights do not change the cost), then ``faiss_index``'s
work (item vectors, index, recall on sample queries), ``user_vectors`` (``encode``: the
encoder's forward pass over every holdout history, once), ``evaluate_track`` with its phase
times (``inputs``: reading histories and vectors; ``search``: Faiss top-10 with the history
exclusion; ``popularity`` and ``oracle``: those rows' lists) and the submission, which reads the
same vectors. The evaluation's cost is encode + evaluate, extrapolated to 1M users, with and
without the oracle row (synthetic data only: real data has no ground truth). The
encoder's achieved GFLOP/s (torch's FlopCounterMode) is printed against the FP32 peak measured
here. The retrieval part at the real 660K-item pool is measured separately by
bench_retrieval.py (the generated pool here is smaller).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flops import achieved, flops_of, measure_cuda_bf16_peak, measure_peak

from models.data import holdout_batch
from models.scoring import query_vectors
from taac_dagster.paths import TrackPaths
from taac_dagster.raw import materialize_raw
from taac_dagster.settings import load_settings
from taac_dagster.steps.index import build_track_index
from taac_dagster.steps.report import evaluate_track
from taac_dagster.steps.semantic_ids import build_semantic_ids
from taac_dagster.steps.submission import submission_for_track
from taac_dagster.steps.trained_encoder import compute_device, load_model, track_arrays
from taac_dagster.steps.training import train_track
from taac_dagster.steps.user_vectors import encode_track_users
from taac_dagster.warehouse import build_warehouse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--mean-history", type=float, default=90.0, help="mean events per user (TencentGR-1M: ~90)")
    parser.add_argument("--track", default="1M")
    parser.add_argument("--presets", default="default")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the idle cores)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.work or scratch)
        base = {
            "data_root": str(root),
            "synthetic": {"num_users": args.users, "num_items": args.items, "mean_history": args.mean_history},
            "training": {"max_steps": args.steps, "val_users": 0, **({"threads": args.threads} if args.threads else {})},
            "evaluation": {"baseline_preset": None},
        }
        paths = TrackPaths(root, args.track)
        settings = load_settings(args.track, base)
        t = time.perf_counter()
        if not paths.warehouse.is_file():
            manifest = materialize_raw(settings, paths)
            build_warehouse(Path(manifest.root), paths, settings)
            build_semantic_ids(paths, settings)
        print(f"data: {args.users:,} users, {args.items:,} items ready in {time.perf_counter() - t:.1f}s")
        cuda = compute_device(settings).type == "cuda"
        # On a GPU the share is of its bf16 peak (what the hardware offers), on a CPU of FP32.
        peak = measure_cuda_bf16_peak() if cuda else measure_peak()
        print(f"{'bf16 peak of ' + torch.cuda.get_device_name() if cuda else f'FP32 peak at {torch.get_num_threads()} threads'}: "
              f"{peak:,.0f} GFLOP/s")
        for preset in args.presets.split(","):
            settings = load_settings(args.track, {**base, "training": {**base["training"], "preset": preset}})
            train_track(paths, settings)
            t = time.perf_counter()
            build = build_track_index(paths, settings)
            index_s = time.perf_counter() - t
            vectors = encode_track_users(paths, settings)
            encode_s = vectors.seconds
            flop_per_user = _encoder_flop_per_user(paths, settings)
            evaluation = evaluate_track(paths, settings)
            t = time.perf_counter()
            submission = submission_for_track(paths, settings)
            submission_s = time.perf_counter() - t
            n = evaluation.users
            phases = {k: v for k, v in evaluation.seconds.items() if k != "total"}
            row = {
                "preset": preset,
                "users": n,
                "pool": build.pool_size,
                "index": build.spec.describe(),
                "search_backend": evaluation.search_backend,
                "device": str(compute_device(settings)),
                "recall@10": round(build.recall, 4),
                "index_s": round(index_s, 2),
                "encode_s": round(encode_s, 2),
                "encode_users_per_s": round(n / encode_s),
                "encode_mflop_per_user": round(flop_per_user / 1e6, 2),
                **{f"encode_{k}": v for k, v in achieved(flop_per_user * n, encode_s, peak).items()},
                "evaluate_s": evaluation.seconds["total"],
                **{f"{k}_s": v for k, v in phases.items()},
                **{f"{k}_users_per_s": round(n / v) for k, v in phases.items() if v > 0},
                "encode_and_evaluate_1M_users_min": round((encode_s + evaluation.seconds["total"]) * 1_000_000 / n / 60, 1),
                "without_oracle_1M_users_min": round(
                    (encode_s + evaluation.seconds["total"] - phases.get("oracle", 0.0)) * 1_000_000 / n / 60, 1),
                "submission_s": round(submission_s, 2),
                "score": round(evaluation.headline["model"]["score"], 4),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            }
            print(json.dumps(row))
            assert submission["users"] == n


def _encoder_flop_per_user(paths: TrackPaths, settings, users: int = 256) -> float:
    """The loaded encoder's FLOPs per user vector, counted on the first holdout histories."""
    arrays = track_arrays(paths, settings)
    device = compute_device(settings)
    loaded = load_model(paths, settings.training.preset, arrays, device)
    inputs = holdout_batch(arrays, np.arange(min(users, int(arrays.meta["num_holdout"]))))
    return flops_of(lambda: query_vectors(loaded, inputs, device)) / len(inputs["items"])


if __name__ == "__main__":
    main()
