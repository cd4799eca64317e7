"""A public benchmark through the whole pipeline: Amazon "Toys and Games" (5-core, the S3-Rec
split) in the competition format, run with the pipeline's defaults, next to published figures.

    .venv/bin/python benchmarks/bench_public.py                          # ../shared/benchmarks/toys_and_games
    .venv/bin/python benchmarks/bench_public.py --data /path/to/toys_and_games --set TAAC_TRAINING__PATIENCE=5

The dataset is read through the ``local`` source from a temporary data root, and ``taac_main``
runs for the 1M track with ``dagster job execute`` (in-process executor), exactly as a user runs
it. The protocol is the published full-ranking one of this split (``--protocol published``, the
default): each user's last item is the test target (the 1M track's holdout: the last click), and
the item before it is **every** user's validation target, held out of training and of
everything learned from the data (Semantic IDs, popularity, the id table's counts): the
pipeline's ``training.val_users`` set to the number of users, so that every training sequence
ends before its user's validation target (RecTools' leave-one-out with a validation mask on all
users; S3-Rec trains on ``items[:-2]``). Every item of the catalogue is ranked, the user's
history items excluded (the report's default history filter). ``--protocol product`` keeps the
pipeline's own default (4,096 validation users, the other users train on their second-to-last
item too): more training pairs, so its test figures are **not** comparable with the published
rows; it is printed with that label.

Printed: HR@10 and NDCG@10 of the model and of popularity (test and validation), the
published full-ranking figures on the same split, the training time (and its steps, the kept
step), the whole run's wall time and the run's peak memory (max RSS of the process). Settings
are the defaults unless ``--set TAAC_KEY=VALUE`` says otherwise; they are printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "benchmarks" / "toys_and_games"
DAGSTER = str(Path(sys.executable).parent / "dagster")

# Full-ranking figures on this split (HR@10 = Recall@10 with one target), as collected by the
# open benchmark of the eSASRec paper (RecSys 2025; blondered/transformer_benchmark).
PUBLISHED = (
    ("SASRec (BCE, one negative)", 0.0675, 0.0374, "TIGER paper, NeurIPS 2023"),
    ("S3-Rec", 0.0700, 0.0376, "reported"),
    ("TIGER (Semantic IDs)", 0.0712, 0.0432, "reported"),
    ("FuXi-alpha", 0.0765, 0.0437, "re-run by the benchmark"),
    ("HSTU", 0.0778, 0.0450, "re-run by the benchmark"),
    ("eSASRec", 0.0939, 0.0538, "re-run by the benchmark"),
    ("SASRec + sampled softmax", 0.0970, 0.0580, "re-run by the benchmark (best known)"),
)


def materialization_metadata(home: Path, asset: str) -> dict:
    """The latest materialization metadata of ``asset`` on the instance in ``home``."""
    os.environ["DAGSTER_HOME"] = str(home)
    from dagster import AssetKey, DagsterInstance

    with DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(AssetKey(asset))
        if event is None:
            return {}
        meta = event.asset_materialization.metadata
        return {key: value.value for key, value in meta.items()}


def run(data: Path, work: Path, env: dict[str, str]) -> dict:
    home = work / "home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("")
    config = work / "run.yaml"
    config.write_text(json.dumps({"execution": {"config": {"in_process": {}}}}))
    run_env = {**env, "DAGSTER_HOME": str(home), "TAAC_DATA_ROOT": str(work / "data"), "TAAC_SOURCE": "local",
               "TAAC_LOCAL_PATH": str(data)}
    command = [DAGSTER, "job", "execute", "-m", "taac_dagster.definitions", "-j", "taac_main",
               "--tags", json.dumps({"dagster/partition": "1M"}), "-c", str(config)]
    log = work / "run.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=REPO, env=run_env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the run failed; its log: {log}\n" + log.read_text()[-3000:])
    report = json.loads((work / "data" / "1M" / "reports" / "evaluation.json").read_text())
    training = materialization_metadata(home, "encoder_checkpoint")
    return {
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
        "report": report,
        "training": training,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"the benchmark folder (default {DEFAULT_DATA})")
    parser.add_argument("--set", action="append", default=[], metavar="TAAC_KEY=VALUE")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder, kept (default: a temp dir, removed)")
    parser.add_argument("--protocol", choices=["published", "product"], default="published",
                        help="published: every user's second-to-last item held out for validation (comparable with "
                        "the published rows); product: the pipeline's default validation sample (not comparable)")
    args = parser.parse_args()
    if not (args.data / "seq.jsonl").is_file():
        raise SystemExit(f"{args.data}: no seq.jsonl; pass --data with the toys_and_games folder (competition format)")

    env = {k: v for k, v in os.environ.items() if not k.startswith("TAAC_")}
    if args.protocol == "published":
        with open(args.data / "seq.jsonl") as lines:
            env["TAAC_TRAINING__VAL_USERS"] = str(sum(1 for line in lines if line.strip()))
    for item in args.set:
        key, _, value = item.partition("=")
        env[key] = value
    print(json.dumps({"data": str(args.data), "settings": {k: v for k, v in env.items() if k.startswith("TAAC_")},
                      "load_average": round(os.getloadavg()[0], 2), "cores": os.cpu_count()}))
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args.data, work, env)

    report, training = result["report"], result["training"]
    methods, validation = report["methods"], report.get("validation") or {}
    label = "published protocol" if args.protocol == "published" else "product protocol: NOT comparable"
    print(f"\n{'':34} {'HR@10':>8} {'NDCG@10':>8}")
    print(f"{'taac-dagster (test)':34} {methods['model']['hr@10']:8.4f} {methods['model']['ndcg@10']:8.4f}   {label}")
    if validation:
        print(f"{'taac-dagster (validation)':34} {validation['hr@10']:8.4f} {validation['ndcg@10']:8.4f}")
    print(f"{'popularity (test)':34} {methods['popularity']['hr@10']:8.4f} {methods['popularity']['ndcg@10']:8.4f}")
    for name, hr, nd, source in PUBLISHED:
        print(f"{name:34} {hr:8.4f} {nd:8.4f}   {source}")
    print(json.dumps({
        "protocol": args.protocol,
        "validation_users": validation.get("users") or env.get("TAAC_TRAINING__VAL_USERS"),
        "users": report["provenance"].get("users"),
        "candidates": report["provenance"].get("candidates"),
        "train_s": training.get("train_seconds"),
        "training_total_s": training.get("total_seconds"),
        "members": training.get("members"),  # an ensemble's steps are its members' summed
        "steps": training.get("steps"),
        "planned_steps": training.get("planned_steps"),
        "best_step": training.get("best_step"),
        "samples_per_second": training.get("samples_per_second"),
        "run_wall_s": result["wall_s"],
        "peak_rss_gb": result["peak_rss_gb"],
        "load_average": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
