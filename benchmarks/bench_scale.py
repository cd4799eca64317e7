"""Scale rehearsal: the whole `taac_main` chain on a generated dataset of the real TencentGR-1M
shape (or a fraction of it), with per-step wall time, peak memory and disk written.

    .venv/bin/python benchmarks/bench_scale.py --scale 0.05         # 50K users, 239K items, ~4.6M events
    .venv/bin/python benchmarks/bench_scale.py --scale 1.0 --work /data/rehearsal     # the real shape, kept
    .venv/bin/python benchmarks/bench_scale.py --scale 0.3 --job taac_data            # raw data + warehouse only
    .venv/bin/python benchmarks/bench_scale.py --phases /data/rehearsal               # two phases alone, again
    .venv/bin/python benchmarks/bench_scale.py --track 10M --scale 0.05 --job taac_data --work /data/s10m  # a 10M slice

The dataset is the generator's (the synthetic source, so the report has its oracle row) in the
Hub parquet layout, at ``--scale`` times the real 1M shape: 1,001,845 users, 4,783,154 items,
660,000 candidates (100 of them cold), mean history 91.06 (~91M events at 1.0), 9.81% clicks,
embedding family 81 (32-d, on ~90% of the items) and family 82 at its real 1,024 dimensions on
~35% of the items (the generator's coverage; why 35%: ``EMBEDDING_COVERAGE`` in
taac_dagster/sources/synthetic/parameters.py; both families are asked for by name, as on auto the
synthetic source writes family 81 alone). Everything else is the pipeline's default, except the
training time budget (``training.max_minutes`` from ``--train-minutes``; default max(2, 60 x
scale): 60 minutes at 1.0). ``--set TAAC_KEY=VALUE`` adds or overrides a setting.

``taac_main`` runs with ``dagster job execute`` on a fresh data root and DAGSTER_HOME, with the
job's own (multiprocess) executor limited to one step at a time, so that every step is its own
process and nothing else runs beside it. Per step:

    wall       STEP_START .. STEP_SUCCESS in the run's event log
    peak RSS   VmHWM of the step's process (its pid is on its STEP_START event), or the largest
               sampled sum of VmRSS over the process and its children if that is higher
    written    write_bytes of /proc/<pid>/io over the step's process tree (bytes sent to the
               storage layer, temporary and spill files included)
    growth     the data root's size after the step minus before it (what the step left on disk)

A sampler thread reads /proc every 0.25 s for every process below the `dagster` command (the
multiprocess executor starts each step from a forkserver child of it), and the data root's size
every second; figures of the last 0.25 s of a process's life can be missed. Phases inside a
step are cut at its log messages: the warehouse's quality checks ("running data-quality
checks" to the step's end) and the training arrays ("encoder_checkpoint" start to "prepared
arrays"); their peak RSS is the largest sampled VmRSS in the window.

Printed last: a markdown table of the steps and phases, then the report's model / popularity /
oracle figures and the model's share of the oracle.

``--phases DIR`` (a folder kept by ``--work``) measures the two phases again, each alone in a
fresh process (peak RSS from wait4): the quality checks on the published warehouse (all of
them, then each check alone), then the array preparation into a scratch folder, with the run's
families and with family 81 alone (at scale 1.0 family 82's dense matrix, 19.6 GB, is over
``max_mm_bytes`` and left out of training, so the 81-only figure is the one that extrapolates).
Results: docs/benchmarks.md ("Scale rehearsal"); what they mean at 1.0: docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DAGSTER = str(Path(sys.executable).parent / "dagster")
TRACK = "1M"  # --track sets it

# The real shapes (docs/domain.md): users, items, candidates, mean history.
REAL_SHAPES = {
    "1M": (1_001_845, 4_783_154, 660_000, 91.06),
    "10M": (10_139_575, 17_487_676, 3_637_720, 97.24),  # ~986M events
}
REAL_CLICK_RATE = 0.0981
COLD_ITEMS = 100  # the generator's default; part of the candidate pool
FAMILIES = "81,82"  # 32-d on ~90% of the items, 1,024-d on ~35%
MAX_EMBEDDING_DIM = 1024  # family 82 at its real dimension
SAMPLE_SECONDS = 0.25
SIZE_SECONDS = 1.0
RUN_CONFIG = {"execution": {"config": {"multiprocess": {"max_concurrent": 1}}}}
# Phases inside a step: (label, step, message that opens it or None for the step's start,
# message that closes it or None for the step's end).
PHASES = (
    ("quality checks", "warehouse_tables", r"running data-quality checks", None),
    ("array preparation", "encoder_checkpoint", None, r"(prepared|reusing prepared) arrays"),
)


def scaled_settings(scale: float, train_minutes: float, track: str = "1M") -> dict[str, str]:
    real_users, real_items, real_candidates, mean_history = REAL_SHAPES[track]
    users = max(10, round(real_users * scale))
    items = max(50, round(real_items * scale))
    candidates = max(COLD_ITEMS + 10, round(real_candidates * scale))
    return {
        "TAAC_SOURCE": "synthetic",
        "TAAC_SYNTHETIC__NUM_USERS": str(users),
        "TAAC_SYNTHETIC__NUM_ITEMS": str(items),
        "TAAC_SYNTHETIC__MEAN_HISTORY": str(mean_history),
        "TAAC_SYNTHETIC__CLICK_RATE": str(REAL_CLICK_RATE),
        "TAAC_SYNTHETIC__COLD_ITEMS": str(COLD_ITEMS),
        "TAAC_SYNTHETIC__CANDIDATE_POOL_SIZE": str(candidates - COLD_ITEMS),  # warm part of the pool
        "TAAC_SYNTHETIC__MAX_EMBEDDING_DIM": str(MAX_EMBEDDING_DIM),
        "TAAC_EMBEDDING_FAMILIES": FAMILIES,
        "TAAC_TRAINING__MAX_MINUTES": f"{train_minutes:g}",
    }


# --- /proc sampling ----------------------------------------------------------------------------
@dataclass
class ProcessTrace:
    ppid: int
    first: float
    last: float = 0.0
    hwm_kb: int = 0
    write_bytes: int = 0
    series: list[tuple[float, int]] = field(default_factory=list)  # (time, VmRSS kB)


def _parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _status_kb(pid: int) -> tuple[int, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M))
    if "VmRSS" not in values:
        return None  # a zombie
    return int(values["VmRSS"]), int(values["VmHWM"])


def _write_bytes(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    match = re.search(r"^write_bytes:\s+(\d+)", text, re.M)
    return int(match.group(1)) if match else None


def folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


class Sampler(threading.Thread):
    """Memory and writes of every process below ``root_pid``; the data root's size."""

    def __init__(self, root_pid: int, data_root: Path) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.data_root = root_pid, data_root
        self.procs: dict[int, ProcessTrace] = {}
        self.sizes: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        next_size = 0.0
        while not self.stop.is_set():
            now = time.time()
            self.sample(now)
            if now >= next_size:
                self.sizes.append((now, folder_bytes(self.data_root)))
                next_size = now + SIZE_SECONDS
            self.stop.wait(SAMPLE_SECONDS)
        self.sizes.append((time.time(), folder_bytes(self.data_root)))

    def sample(self, now: float) -> None:
        parents = _parent_map()
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        todo = [self.root_pid]
        while todo:
            pid = todo.pop()
            todo.extend(children.get(pid, []))
            kb = _status_kb(pid)
            if kb is None:
                continue
            trace = self.procs.get(pid)
            if trace is None or trace.ppid != parents.get(pid, 0):  # a new process (or a reused pid)
                trace = self.procs[pid] = ProcessTrace(ppid=parents.get(pid, 0), first=now)
            trace.last = now
            trace.hwm_kb = max(trace.hwm_kb, kb[1])
            trace.series.append((now, kb[0]))
            written = _write_bytes(pid)
            if written is not None:
                trace.write_bytes = max(trace.write_bytes, written)

    def subtree(self, pid: int) -> list[int]:
        """``pid`` and every sampled process below it."""
        out = [pid]
        for candidate, trace in self.procs.items():
            parent = trace.ppid
            while parent and parent in self.procs and parent != pid:
                parent = self.procs[parent].ppid
            if parent == pid and candidate != pid:
                out.append(candidate)
        return out

    def size_at(self, when: float, *, before: bool) -> int | None:
        """The data root's size at the last sample before ``when`` (or the first after it)."""
        if before:
            earlier = [size for t, size in self.sizes if t <= when]
            return earlier[-1] if earlier else None
        later = [size for t, size in self.sizes if t >= when]
        return later[0] if later else None

    def peak_rss_kb(self, pids: list[int], start: float, end: float) -> int:
        """The largest sampled sum of VmRSS over ``pids`` in [start, end]."""
        totals: dict[float, int] = {}
        for pid in pids:
            for t, rss in self.procs[pid].series if pid in self.procs else ():
                if start <= t <= end:
                    totals[t] = totals.get(t, 0) + rss
        return max(totals.values(), default=0)


# --- The run -----------------------------------------------------------------------------------
def run_chain(work: Path, env: dict[str, str], job: str = "taac_main") -> tuple[float, int, Sampler]:
    home, data = work / "home", work / "data"
    home.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("")
    config = work / "run.yaml"
    config.write_text(json.dumps(RUN_CONFIG))
    run_env = {**env, "DAGSTER_HOME": str(home), "TAAC_DATA_ROOT": str(data)}
    command = [DAGSTER, "job", "execute", "-m", "taac_dagster.definitions", "-j", job,
               "--tags", json.dumps({"dagster/partition": TRACK}), "-c", str(config)]
    log = work / "run.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=run_env, stdout=out, stderr=subprocess.STDOUT)
        sampler = Sampler(process.pid, data)
        sampler.start()
        code = process.wait()
        sampler.stop.set()
        sampler.join()
    return time.perf_counter() - started, code, sampler


@dataclass
class StepFigures:
    step: str
    start: float
    end: float | None
    pid: int | None
    succeeded: bool
    metadata: dict[str, dict[str, Any]]  # asset -> materialization metadata
    logs: list[tuple[float, str]]
    failure: str | None = None


def read_run(home: Path) -> tuple[float, float, list[StepFigures]]:
    os.environ["DAGSTER_HOME"] = str(home)
    from dagster import DagsterEventType, DagsterInstance

    with DagsterInstance.get() as instance:
        run = instance.get_runs(limit=1)[0]
        records = instance.all_logs(run.run_id)
    steps: dict[str, StepFigures] = {}
    run_start = min(r.timestamp for r in records)
    run_end = max(r.timestamp for r in records)
    for r in records:
        event = r.dagster_event
        if not r.step_key:
            continue
        step = steps.setdefault(r.step_key, StepFigures(r.step_key, r.timestamp, None, None, False, {}, []))
        if event is None:
            step.logs.append((r.timestamp, r.user_message))
            continue
        if event.event_type == DagsterEventType.STEP_START:
            step.start, step.pid = r.timestamp, event.pid
        elif event.event_type == DagsterEventType.STEP_SUCCESS:
            step.end, step.succeeded = r.timestamp, True
        elif event.event_type == DagsterEventType.STEP_FAILURE:
            step.end = r.timestamp
            error = event.event_specific_data.error
            step.failure = error.to_string() if error else event.message
        elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            materialization = event.event_specific_data.materialization
            step.metadata[materialization.asset_key.to_user_string()] = {
                key: value.value for key, value in materialization.metadata.items()
            }
    return run_start, run_end, sorted(steps.values(), key=lambda s: s.start)


def _gb(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1e9:.3f}" if abs(value) < 1e9 else f"{value / 1e9:.2f}"


def _secs(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def step_rows(steps: list[StepFigures], sampler: Sampler) -> list[list[str]]:
    rows = []
    for step in steps:
        end = step.end if step.end is not None else step.start
        pids = sampler.subtree(step.pid) if step.pid else []
        hwm = max((sampler.procs[p].hwm_kb for p in pids[:1] if p in sampler.procs), default=0)
        peak_kb = max(hwm, sampler.peak_rss_kb(pids, step.start, end + 1))
        written = sum(sampler.procs[p].write_bytes for p in pids if p in sampler.procs)
        before, after = sampler.size_at(step.start, before=True), sampler.size_at(end, before=False)
        growth = None if before is None or after is None else after - before
        label = step.step + ("" if step.succeeded else " (FAILED)")
        rows.append([label, _secs(end - step.start), _gb(peak_kb * 1024), _gb(written), _gb(growth)])
        for name, key, opens, closes in PHASES:
            if key != step.step:
                continue
            lo = step.start if opens is None else next((t for t, m in step.logs if re.search(opens, m)), None)
            hi = end if closes is None else next((t for t, m in step.logs if re.search(closes, m)), None)
            if lo is None or hi is None:
                continue
            peak = sampler.peak_rss_kb(pids, lo, hi)
            at_start = sampler.peak_rss_kb(pids, lo - SAMPLE_SECONDS * 2, lo)
            rows.append([f"  {name}", _secs(hi - lo), f"{_gb(peak * 1024)} (from {_gb(at_start * 1024)})", "", ""])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report_table(report: dict[str, Any]) -> str:
    rows = []
    for method, figures in report.get("methods", {}).items():
        rows.append([method, f"{figures.get('hr@10', 0):.4f}", f"{figures.get('ndcg@10', 0):.4f}",
                     f"{figures.get('score', 0):.4f}"])
    share = report.get("oracle_share") or {}
    if share:
        rows.append(["model / oracle", f"{share.get('hr@10', 0):.1%}", f"{share.get('ndcg@10', 0):.1%}",
                     f"{share.get('score', 0):.1%}"])
    return markdown_table(["", "HR@10", "NDCG@10", "score"], rows)


PHASE_CODE = {
    "checks": """
import json, sys, time
from pathlib import Path
from taac_dagster.quality import run_checks
from taac_dagster.settings import TaacSettings
settings = TaacSettings()
started = time.perf_counter()
names = None if sys.argv[2] == "all" else [sys.argv[2]]
[outcome, *_] = run_checks(Path(sys.argv[1]), sys.argv[3], max_history=settings.max_history,
                           sample_users=settings.check_sample_users, names=names, settings=settings)
print(json.dumps({"seconds": round(time.perf_counter() - started, 2), "passed": outcome.passed}))
""",
    "arrays": """
import json, sys
from pathlib import Path
from taac_dagster.steps.arrays import PrepareOptions, prepare_arrays
from taac_dagster.settings import TaacSettings
settings = TaacSettings()
families = tuple(int(f) for f in sys.argv[3].split(","))
arrays = prepare_arrays(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[4], PrepareOptions(families=families),
                        codebooks_json=Path(sys.argv[1]).parent / "codebooks" / "codebooks.json",
                        reuse=False, settings=settings)
print(json.dumps({"seconds": arrays.meta["seconds"], "families": arrays.meta["families"],
                  "events": arrays.meta["num_events"]}))
""",
}


def measure_phase(name: str, *args: str, settings: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one phase alone in a fresh process: its output, wall time and peak RSS (wait4). A
    phase that fails, or ends without its JSON line, gives an ``error`` with its stderr's tail
    instead of stopping the phases after it."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TAAC_")}, **(settings or {})}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen([sys.executable, "-c", PHASE_CODE[name], *args], cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=errors, text=True)
        output = process.stdout.read() if process.stdout else ""
        _, status, usage = os.wait4(process.pid, 0)
        errors.seek(0)
        tail = errors.read()[-2000:]
    figures = {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2)}
    lines = [line for line in output.splitlines() if line.startswith("{")]
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not lines:
        return {**figures, "error": f"exit code {code}" + ("" if lines else ", no result line"), "stderr_tail": tail}
    return {**figures, **json.loads(lines[-1])}


def measure_phases(work: Path, settings: dict[str, str]) -> None:
    warehouse = work / "data" / TRACK / "warehouse.duckdb"
    if not warehouse.is_file():
        raise SystemExit(f"{warehouse} is missing: pass a folder kept by --work")
    from taac_dagster.quality import CHECKS

    for name in ["all", *(check.name for check in CHECKS)]:
        result = measure_phase("checks", str(warehouse), name, TRACK, settings=settings)
        print(json.dumps({"phase": f"quality checks: {name}", **result}), flush=True)
    for families in (FAMILIES, "81"):
        with tempfile.TemporaryDirectory(prefix="bench_scale_arrays_") as scratch:
            result = measure_phase("arrays", str(warehouse), str(Path(scratch) / "arrays"), families, TRACK,
                                   settings=settings)
        print(json.dumps({"phase": f"array preparation, families {families}", **result}), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.01, help="users, items and candidates x this (1.0: real shape)")
    parser.add_argument("--track", choices=sorted(REAL_SHAPES), default="1M",
                        help="whose real shape --scale multiplies, and the partition run (default 1M)")
    parser.add_argument("--train-minutes", type=float, default=None,
                        help="training.max_minutes (default: max(2, 60 x scale))")
    parser.add_argument("--work", type=Path, default=None, help="folder for the data root and instance (kept)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder when --work is not given")
    parser.add_argument("--set", action="append", default=[], metavar="TAAC_KEY=VALUE")
    parser.add_argument("--job", choices=["taac_main", "taac_data"], default="taac_main",
                        help="taac_data: the raw dataset and the warehouse only")
    parser.add_argument("--phases", type=Path, default=None, metavar="DIR",
                        help="measure the quality checks and the array preparation alone on a folder kept by --work")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global TRACK
    args = parse_args(argv)
    TRACK = args.track
    if args.phases is not None:
        measure_phases(args.phases, dict(item.partition("=")[::2] for item in args.set))
        return 0
    from taac_dagster.settings import TrainingSettings

    minutes = args.train_minutes if args.train_minutes is not None else max(2.0, 60.0 * args.scale)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAAC_")}
    env.update(scaled_settings(args.scale, minutes, args.track))
    for item in args.set:
        key, _, value = item.partition("=")
        env[key] = value
    bounded = "max_minutes" in TrainingSettings.model_fields or "TAAC_TRAINING__MAX_STEPS" in env
    if args.job == "taac_main" and not bounded:
        raise SystemExit("this checkout has no training.max_minutes setting, so the training would run unbounded: "
                         "pass a bound, e.g. --set TAAC_TRAINING__MAX_STEPS=2000")
    settings = {k: v for k, v in env.items() if k.startswith("TAAC_")}
    print(json.dumps({"scale": args.scale, "settings": settings, "cores": os.cpu_count(),
                      "load_average": round(os.getloadavg()[0], 2)}), flush=True)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"{work} is not empty: the rehearsal starts from a fresh data root")
    try:
        wall, code, sampler = run_chain(work, env, args.job)
        run_start, run_end, steps = read_run(work / "home")
        rows = step_rows(steps, sampler)
        report_path = work / "data" / TRACK / "reports" / "evaluation.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        dagster_peak = max((t.hwm_kb for t in sampler.procs.values()), default=0)
        data_bytes = folder_bytes(work / "data")
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    raw = next((s.metadata.get("raw_dataset", {}) for s in steps if s.step == "raw_dataset"), {})
    generated = (raw.get("details") or {}).get("generated", {})
    training = next((s.metadata.get("encoder_checkpoint", {}) for s in steps if s.step == "encoder_checkpoint"), {})
    print(json.dumps({
        "exit_code": code,
        "wall_s": round(wall, 1),
        "run_s": round(run_end - run_start, 1),
        "dataset": {k: generated.get(k) for k in ("users", "items", "cold_items", "events", "clicks", "candidates",
                                                   "families", "bytes_written", "seconds")},
        "training": {k: training.get(k) for k in ("steps", "planned_steps", "best_step", "stopped_early",
                                                   "train_seconds", "total_seconds", "samples_per_second",
                                                   "families")},
        "data_root_gb": round(data_bytes / 1e9, 2),
        "largest_process_peak_gb": round(dagster_peak * 1024 / 1e9, 2),
        "load_average": round(os.getloadavg()[0], 2),
        "work": str(work) if (args.work or args.keep) else None,
    }, default=str))
    print()
    print(markdown_table(["step", "wall s", "peak RSS GB", "written GB", "data root growth GB"], rows))
    if report:
        print()
        print(report_table(report))
    for step in steps:
        if step.failure:
            print(f"\n{step.step} failed:\n{step.failure}")
    if code != 0:
        print(f"\nthe run failed (exit code {code}); its log: {work / 'run.log'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
