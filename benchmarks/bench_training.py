"""Training throughput and peak memory on a TencentGR-1M-shaped dataset.

A synthetic TencentGR-1M-shaped dataset (100K users, 200K items, ~9.1M events, Hub parquet)
is generated and loaded into a DuckDB warehouse once, the training arrays are prepared once,
then, each in a fresh subprocess so that peak memory (VmHWM) is per measurement:

- ``e2e``: the real training loop (``models.train.train``) from the memory-mapped arrays:
  batch building, the step, the optimizers; sequences/s and tokens/s over the measured steps
- ``model``: the step alone on prebuilt batches (forward, backward, optimizer steps)
- the model FLOPs per step (torch's FlopCounterMode for the matmuls, plus the attention,
  which it does not see on CPU), hence the achieved FLOP/s
- ``e2e`` with the id table at the real TencentGR-1M vocabulary (4,783,155 rows, sparse
  gradients + SparseAdam): what the real shape costs next to the small one

for the ``baseline`` and ``default`` presets. Everything is deleted afterwards (unless --work).

Rates are given for the median step (robust to other jobs on a shared machine) and over the
whole run; the 1-minute load average before and after each measurement is printed with it.

    python benchmarks/bench_training.py                     # all of it (~10 minutes on 2 cores)
    python benchmarks/bench_training.py --presets baseline --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REAL_1M_ITEMS = 4_783_155


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(mode: str, arrays_dir: str, preset_name: str, steps: int, threads: int | None, batch: int | None,
           malloc: str, model_json: str = "{}") -> None:
    import numpy as np
    import torch
    from flops import measure_cuda_bf16_peak, measure_peak

    from models import allocator

    if malloc == "default":  # glibc's own settings, also inside train()
        allocator._applied = False
    else:
        allocator.keep_freed_memory()

    from models.auto_settings import matmul_gflops, resolve_model_settings, resolve_train_settings
    from models.batches import BatchMaker
    from models.data import load_arrays
    from models.encoder import Encoder, ItemTables, count_parameters
    from models.encoder_config import EncoderConfig
    from models.runtime import to_device
    from models.train import train
    from models.train_config import negative_spec
    from models.trainer import make_optimizers
    from taac_dagster.steps.training import load_preset, track_run

    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # The share of the peak the step runs at: bf16 products on a GPU (the step runs under bf16
    # autocast there), FP32 on a CPU.
    peak = (measure_cuda_bf16_peak() if cuda else measure_peak()) * 1e9
    arrays = load_arrays(arrays_dir)
    train_over = {"max_steps": steps, "val_users": 0, "log_every": 0, "threads": torch.get_num_threads()}
    if batch:
        train_over["batch_size"] = batch
        train_over["cuda_batch_size"] = None
    model_over = {"id_rows": REAL_1M_ITEMS + 1} if mode == "e2e_real_vocab" else {}
    model_over.update(json.loads(model_json))
    compiled = bool(model_over.pop("compile", False))
    preset = load_preset(preset_name, {"model": model_over, "train": train_over})
    tc = preset.train = resolve_train_settings(preset.train, arrays.meta, device)
    lengths = (np.asarray(arrays.seq_items) > 0).sum(axis=1)
    tokens_per_seq = float(lengths.mean()) + 1  # items + the user token
    out: dict = {"mode": mode, "preset": preset_name, "threads": torch.get_num_threads(), "malloc": malloc,
                 "device": torch.cuda.get_device_name() if cuda else "cpu", "peak_kind": "bf16" if cuda else "fp32",
                 "peak_gflops": peak / 1e9, "load_before": os.getloadavg()[0], "model_overrides": model_over}

    if mode.startswith("e2e"):
        # Warm up on two steps (first-touch of the memory maps, allocator), then measure.
        warm_up = load_preset(preset_name, {"model": model_over, "train": {**train_over, "max_steps": 2}})
        train(arrays, warm_up, track=track_run("1M"))
        step_rates: list[float] = []
        record = lambda r: step_rates.append(r["samples_per_s"]) if r.get("event") == "progress" else None  # noqa: E731
        preset.train.log_every = 1
        started = time.perf_counter()
        result = train(arrays, preset, track=track_run("1M"), on_log=record)
        seconds = time.perf_counter() - started
        out.update(steps=result.steps, batch=tc.batch_size, seconds=seconds, params=result.params,
                   sequences_per_s=result.steps * tc.batch_size / seconds,
                   median_step_sequences_per_s=float(np.median(step_rates)),
                   # The loss curve (same seed and batches): a faster step must not change it.
                   loss_first_5=float(np.mean(result.losses[:5])), loss_last_5=float(np.mean(result.losses[-5:])))
    else:
        from torch.utils.flop_counter import FlopCounterMode

        torch.manual_seed(0)
        rows = int(arrays.meta.get("num_softmax_rows", arrays.meta["num_item_rows"]))
        gflops = matmul_gflops(device, int(preset.model.get("d_model", 64)), rows)
        cfg = EncoderConfig.from_meta(arrays.meta, **resolve_model_settings(preset.model, tc, arrays.meta, gflops=gflops))
        model = Encoder(cfg).to(device).attach(ItemTables.from_arrays(arrays).to(device))
        model.train()
        if compiled:
            model.compile_blocks()
        optimizers = make_optimizers(model, tc)
        maker = BatchMaker(arrays, tc.batch_size, seed=0, action_weights=tc.action_weights, negatives=negative_spec(tc))
        batches = [to_device(maker.batch(i), device) for i in range(4)]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and tc.bf16)

        def step(batch):
            with autocast:
                loss, _ = model(batch)
            loss.backward()
            for opt in optimizers.values():
                opt.step()
                opt.zero_grad(set_to_none=True)

        def sync():
            if cuda:
                torch.cuda.synchronize()

        for b in batches[:2]:
            step(b)
        sync()
        with FlopCounterMode(display=False) as counter:
            step(batches[0])
        flops = counter.get_total_flops()
        if not cuda:  # on a CPU the counter does not see the attention: QK^T and AV, fwd + bwd
            S = batches[0]["items"].shape[1] + 1
            flops += 12 * tc.batch_size * S * S * cfg.d_model * cfg.n_layers
        times = []
        for i in range(steps):
            sync()
            t0 = time.perf_counter()
            step(batches[i % len(batches)])
            sync()
            times.append(time.perf_counter() - t0)
        seconds = sum(times)
        out.update(steps=steps, batch=tc.batch_size, seconds=seconds, params=count_parameters(model),
                   width=cfg.d_model, layers=cfg.n_layers, loss=cfg.loss, compiled=compiled,
                   sequences_per_s=steps * tc.batch_size / seconds, mflop_per_sequence=flops / tc.batch_size / 1e6,
                   median_step_sequences_per_s=tc.batch_size / float(np.median(times)))
        out["gflop_per_s"] = flops * out["median_step_sequences_per_s"] / tc.batch_size / 1e9
        out["peak_share"] = out["gflop_per_s"] * 1e9 / peak
    out["tokens_per_s"] = out["median_step_sequences_per_s"] * tokens_per_seq
    out["peak_rss_mb"] = _peak_rss_mb()
    out["load_after"] = os.getloadavg()[0]
    print(json.dumps(out))


def _prepare_child(warehouse: str, arrays_dir: str) -> None:
    from taac_dagster.steps.arrays import PrepareOptions, prepare_arrays

    started = time.perf_counter()
    arrays = prepare_arrays(Path(warehouse), Path(arrays_dir), "1M", PrepareOptions(), reuse=False)
    print(json.dumps({"mode": "prepare", "seconds": time.perf_counter() - started, "sequences": arrays.num_sequences,
                      "events": arrays.meta["num_events"], "item_rows": arrays.meta["num_item_rows"],
                      "peak_rss_mb": _peak_rss_mb()}))


def _run(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--mean-history", type=float, default=91.0)
    parser.add_argument("--presets", default="baseline,default")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default: 20 baseline, 40 default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=None, help="override the presets' batch size")
    parser.add_argument("--modes", default="e2e,model,e2e_real_vocab")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed)")
    parser.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                        help="tuned: models/allocator.py's glibc settings, as the pipeline trains; default: glibc's own")
    parser.add_argument("--shapes", default="",
                        help="model shapes to measure besides the preset's, as WIDTHxBLOCKS[,...] (heads: width/64), "
                             "e.g. 256x4,512x8,1024x8")
    parser.add_argument("--loss", default=None,
                        help="force the model's loss (e.g. infonce, what the real catalogues train with), else auto")
    parser.add_argument("--compile", action="store_true",
                        help="also measure each model-mode shape with its blocks compiled (Encoder.compile_blocks)")
    parser.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    parser.add_argument("--prepare-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, arrays_dir, preset, steps, threads, batch, malloc, model_json = args.child
        _child(mode, arrays_dir, preset, int(steps), int(threads) or None, int(batch) or None, malloc, model_json)
        return
    if args.prepare_child:
        _prepare_child(*args.prepare_child)
        return

    import torch

    from taac_dagster.paths import TrackPaths

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, {torch.get_num_threads()} threads")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_training_"))
    try:
        paths = TrackPaths(work, "1M")
        arrays_dir = paths.checkpoints / "arrays"
        if args.work and (arrays_dir / "meta.json").is_file():
            print(f"reusing the dataset and arrays in {work} (--work)")
        else:
            _build_dataset(args, work, paths, arrays_dir)
        _measure(args, arrays_dir)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _build_dataset(args: argparse.Namespace, work: Path, paths, arrays_dir: Path) -> None:
    from taac_dagster.settings import SyntheticSettings, load_settings
    from taac_dagster.sources.synthetic import generate_dataset
    from taac_dagster.warehouse import build_warehouse

    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    cfg = SyntheticSettings(num_users=args.users, num_items=args.items, mean_history=args.mean_history, seed=7, cold_items=1000)
    started = time.perf_counter()
    summary = generate_dataset(raw, "1M", cfg, [81])
    seconds = time.perf_counter() - started
    print(f"generated {summary.events:,} events ({args.users:,} users, {args.items:,} items) in {seconds:.0f}s")
    settings = load_settings("1M", {"data_root": str(work), "source": "local", "local_path": str(raw)})
    started = time.perf_counter()
    build_warehouse(raw, paths, settings)
    print(f"warehouse built in {time.perf_counter() - started:.0f}s")
    shutil.rmtree(raw)
    prep = _run(["--prepare-child", str(paths.warehouse), str(arrays_dir)])
    print(f"arrays prepared once: {prep['sequences']:,} sequences, {prep['events']:,} events, {prep['item_rows']:,} item rows "
          f"in {prep['seconds']:.1f}s ({prep['events'] / prep['seconds']:,.0f} events/s), peak RSS {prep['peak_rss_mb']:,.0f} MB")


def _shape_overrides(shape: str) -> dict:
    width, blocks = (int(v) for v in shape.lower().split("x"))
    return {"d_model": width, "n_layers": blocks, "n_heads": max(1, width // 64)}


def _measure(args: argparse.Namespace, arrays_dir: Path) -> None:
    rows = []
    shapes = [s for s in args.shapes.split(",") if s]
    for preset in args.presets.split(","):
        forced = {"loss": args.loss} if args.loss else {}
        runs = [(mode, dict(forced)) for mode in args.modes.split(",") if mode]
        runs += [("model", {**_shape_overrides(shape), **forced}) for shape in shapes]
        if args.compile:
            runs += [("model", {**model, "compile": True}) for mode, model in list(runs) if mode == "model"]
        for mode, model in runs:
            steps = args.steps or (20 if preset == "baseline" else 40)
            r = _run(["--child", mode, str(arrays_dir), preset, str(steps), str(args.threads or 0), str(args.batch or 0),
                      args.malloc, json.dumps(model)])
            rows.append(r)
            extra = ""
            if "gflop_per_s" in r:
                extra = (f", width {r['width']} x {r['layers']} blocks{' compiled' if r['compiled'] else ''}, loss {r['loss']}, "
                         f"{r['mflop_per_sequence']:.2f} MFLOP/sequence, {r['gflop_per_s']:,.1f} GFLOP/s "
                         f"({r['peak_share']:.1%} of the {r['peak_gflops']:,.0f} GFLOP/s {r['peak_kind']} peak measured now)")
            print(
                f"[{preset:8s} {mode:15s}] {r['device']}, batch {r['batch']}, {r['steps']} steps, {r['threads']} threads: "
                f"{r['median_step_sequences_per_s']:>7,.0f} sequences/s (median step; {r['sequences_per_s']:,.0f} over the "
                f"whole run), {r['tokens_per_s']:>9,.0f} tokens/s, "
                f"peak RSS {r['peak_rss_mb']:,.0f} MB, params {r['params']['total']:,} ({r['params']['sparse']:,} sparse){extra}"
                f" [load average {r['load_before']:.1f} -> {r['load_after']:.1f}]",
                flush=True,
            )
    print(json.dumps({"runs": rows}))


if __name__ == "__main__":
    main()
