"""One A/B row: train a preset with overrides on already prepared arrays, then score the kept
weights on the validation split and on the test split (every holdout user), the way training
validates and the report ranks (the released pool, history items excluded).

    .venv/bin/python benchmarks/bench_ab.py --arrays WORK/data/1M/checkpoints/arrays \
        --label "dropout 0.5" --set model.dropout=0.5 --out ab.jsonl

The arrays come from a pipeline run (``benchmarks/bench_public.py --work WORK`` keeps them), so
every row of a table trains on the same data under the same protocol; validation covers every
validation user of the arrays (``train.val_users`` set to their number) unless ``--set`` says
otherwise. Settings are chosen on the validation columns; test is printed for the record.
Prints one JSON line (and appends it to ``--out``): the label, the overrides, validation and
test HR@10 / NDCG@10, training seconds, steps, the kept step and the planned steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arrays", required=True, help="a prepared arrays folder (checkpoints/arrays of a run)")
    parser.add_argument("--config", default="default", help="preset (configs/models/) the overrides apply to")
    parser.add_argument("--track", default="1M")
    parser.add_argument("--label", default="defaults")
    parser.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE or train.KEY=VALUE")
    parser.add_argument("--out", default=None, help="append the JSON line to this file")
    parser.add_argument("--keep", default=None, help="copy the kept checkpoint to this path")
    args = parser.parse_args(argv)

    import torch

    from models.checkpoint import load_encoder
    from models.data import load_arrays
    from models.train import train
    from models.validation import evaluate
    from taac_dagster.steps.train_cli import apply_set_options
    from taac_dagster.steps.training import default_retrieval_actions, load_preset, publish_file, track_run

    arrays = load_arrays(args.arrays)
    overrides = apply_set_options(args.set, {"model": {}, "train": {}})
    overrides["train"].setdefault("val_users", int(arrays.meta.get("num_val", 0)))
    preset = load_preset(args.config, overrides)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_ab_") as folder:
        result = train(arrays, preset, track=track_run(args.track), checkpoint_dir=Path(folder), resume=False,
                       on_log=lambda record: None, writer=publish_file)
        seconds = time.perf_counter() - started
        if args.keep:
            shutil.copyfile(result.checkpoint, args.keep)
        model, _ = load_encoder(result.checkpoint, arrays)
        actions = tuple(preset.train.retrieval_actions or default_retrieval_actions(args.track))
        device = torch.device("cpu")
        val = evaluate(model, arrays, np.arange(min(int(arrays.meta["num_val"]), preset.train.val_users)), actions,
                       device=device, split="val")
        test = evaluate(model, arrays, np.arange(int(arrays.meta["num_holdout"])), actions, device=device,
                        split="hold")
    row = {
        "label": args.label, "overrides": {k: v for k, v in overrides.items() if v},
        "val_hr10": round(val["hr@10"], 4), "val_ndcg10": round(val["ndcg@10"], 4),
        "test_hr10": round(test["hr@10"], 4), "test_ndcg10": round(test["ndcg@10"], 4),
        "val_users": val["users"], "test_users": test["users"],
        "train_seconds": round(seconds, 1), "steps": result.steps, "best_step": result.best_step,
        "planned_steps": result.planned_steps,
    }
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(line + "\n")
    return row


if __name__ == "__main__":
    main()
