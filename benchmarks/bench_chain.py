"""Wall time of the whole chain for one partition, as a user runs it (`dagster job execute`),
with the default (multiprocess) executor and in-process, and what each step costs around its
own work.

    .venv/bin/python benchmarks/bench_chain.py                       # embedded default, both executors
    .venv/bin/python benchmarks/bench_chain.py --executors in_process --users 1000000 --items 1000000 \\
        --set TAAC_TRAINING__MAX_STEPS=200 --set TAAC_EVALUATION__MAX_USERS=50000   # 1M-track shape

Each executor gets a fresh data root and DAGSTER_HOME (nothing reused), runs `taac_main` once,
and the per-step figures are read back from the run's events on the instance:

    step wall     STEP_START .. STEP_SUCCESS (the step's own work + its framework work)
    step overhead step wall - the asset's own time (the `seconds`/`total_seconds` it records;
                  not shown for the warehouse multi-asset, whose tables record their parts)
    launch        first STEP_START - RUN_START; with the multiprocess executor every step is a
                  fresh Python process that imports Dagster, torch and the definitions, which
                  is the gap between the sum of step walls and the in-process run

`--set KEY=VALUE` passes settings (environment) to the run, e.g. the synthetic scale or the
training length; `--users/--items` are shorthands for the synthetic scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAGSTER = str(Path(sys.executable).parent / "dagster")
EXECUTOR_CONFIG = {
    "multiprocess": None,  # the job's default: multi_or_in_process_executor -> multiprocess
    "in_process": {"execution": {"config": {"in_process": {}}}},
}


def run_chain(executor: str, work: Path, env: dict[str, str], track: str) -> dict:
    home = work / executor / "home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("")
    run_env = {**env, "DAGSTER_HOME": str(home), "TAAC_DATA_ROOT": str(work / executor / "data")}
    command = [DAGSTER, "job", "execute", "-m", "taac_dagster.definitions", "-j", "taac_main",
               "--tags", json.dumps({"dagster/partition": track})]
    if EXECUTOR_CONFIG[executor]:
        config = work / executor / "run.yaml"
        config.write_text(json.dumps(EXECUTOR_CONFIG[executor]))
        command += ["-c", str(config)]
    log = work / executor / "run.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=REPO, env=run_env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{executor}: the run failed; see {log}")
    return {"executor": executor, "wall_s": round(wall, 1), **step_figures(home)}


def step_figures(home: Path) -> dict:
    os.environ["DAGSTER_HOME"] = str(home)
    from dagster import DagsterEventType, DagsterInstance

    with DagsterInstance.get() as instance:
        run = instance.get_runs(limit=1)[0]
        records = instance.all_logs(run.run_id)
        run_start = next(
            r.timestamp for r in records if r.dagster_event and r.dagster_event.event_type == DagsterEventType.RUN_START
        )
        run_end = max(r.timestamp for r in records)
        steps: dict[str, dict] = {}
        for r in records:
            event = r.dagster_event
            if event is None or not r.step_key:
                continue
            step = steps.setdefault(r.step_key, {})
            if event.event_type == DagsterEventType.STEP_START:
                step["start"] = r.timestamp
            elif event.event_type == DagsterEventType.STEP_SUCCESS:
                step["end"] = r.timestamp
            elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                step["materializations"] = step.get("materializations", 0) + 1
                meta = event.event_specific_data.materialization.metadata
                for key in ("total_seconds", "seconds", "train_seconds"):
                    value = meta.get(key)
                    if value is None:
                        continue
                    value = value.value
                    own = value.get("total") if isinstance(value, dict) else value
                    if isinstance(own, (int, float)):
                        step["own"] = max(step.get("own", 0.0), float(own))
                        break
    rows = []
    for key, s in sorted(steps.items(), key=lambda kv: kv[1].get("start", 0)):
        wall = s.get("end", s.get("start", 0)) - s.get("start", 0)
        row = {"step": key, "wall_s": round(wall, 2)}
        if "own" in s and s.get("materializations") == 1:  # a multi-asset's tables time parts only
            row["own_s"] = round(s["own"], 2)
            row["overhead_s"] = round(wall - s["own"], 2)
        rows.append(row)
    first = min(s["start"] for s in steps.values() if "start" in s)
    return {
        "run_s": round(run_end - run_start, 1),
        "launch_s": round(first - run_start, 1),
        "sum_step_wall_s": round(sum(r["wall_s"] for r in rows), 1),
        # Run time outside any step: with the multiprocess executor, mostly starting one Python
        # process per step (imports of Dagster, torch and the definitions) before its STEP_START.
        "outside_steps_s": round(run_end - run_start - sum(r["wall_s"] for r in rows), 1),
        "outside_steps_per_step_s": round((run_end - run_start - sum(r["wall_s"] for r in rows)) / max(1, len(rows)), 2),
        "steps": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--executors", default="multiprocess,in_process")
    parser.add_argument("--track", default="1M")
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--items", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="TAAC_KEY=VALUE")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed)")
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith("TAAC_")}
    if args.users:
        env["TAAC_SYNTHETIC__NUM_USERS"] = str(args.users)
    if args.items:
        env["TAAC_SYNTHETIC__NUM_ITEMS"] = str(args.items)
    for item in args.set:
        key, _, value = item.partition("=")
        env[key] = value
    print(json.dumps({"settings": {k: v for k, v in env.items() if k.startswith("TAAC_")},
                      "load_average": os.getloadavg()[0]}))
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        results = [run_chain(executor, work, env, args.track) for executor in args.executors.split(",")]
    for result in results:
        print(json.dumps({k: v for k, v in result.items() if k != "steps"}))
        for row in result["steps"]:
            print("   ", json.dumps(row))
    if len(results) == 2:
        a, b = results
        n = len(a["steps"])
        print(json.dumps({
            "wall_difference_s": round(a["wall_s"] - b["wall_s"], 1),
            "per_step_difference_s": round((a["sum_step_wall_s"] - b["sum_step_wall_s"]) / max(1, n), 2),
            "load_average": os.getloadavg()[0],
        }))


if __name__ == "__main__":
    main()
