"""Peak memory of the default preset's training step at the real item vocabularies.

    .venv/bin/python benchmarks/bench_id_table.py                  # 1M (4.78M items) and 10M (17.5M items)
    .venv/bin/python benchmarks/bench_id_table.py --tracks 10M --steps 20

For each track the model is built the way training builds it (``resolve_model_settings``:
``id_buckets: auto`` against ``max_id_table_bytes``, sparse id table + SparseAdam), with the
item feature tables and one 32-d multi-modal family at the real row count, and trained for a
few steps on random histories of 100 events (batch 256, InfoNCE over the batch's items plus
sampled negatives: the loss ``auto`` picks at these catalogue sizes). Printed per track: the id
table's rows (hashed or not), parameters, the id table with its Adam moments, steps/s and the
process's peak RSS, measured in a fresh subprocess per track.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ITEMS = {"1M": 4_783_154, "10M": 17_487_676}


def _peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def child(track: str, steps: int, batch_negatives: int | None) -> None:
    import numpy as np
    import torch

    from models.auto_settings import resolve_model_settings
    from models.batches import NegativeSpec
    from models.encoder import Encoder, ItemTables
    from models.encoder_config import EncoderConfig
    from models.trainer import make_optimizers
    from taac_dagster.steps.training import load_preset

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n_items = ITEMS[track]
    n_actions = 3 if track == "10M" else 2
    meta = {
        "num_item_rows": n_items + 1, "id_rows": n_items + 1, "item_vocab": [100_000, 1_000, 50, 20],
        "user_vocab": {"103": 100, "104": 3, "105": 10, "109": 5, "106": 50, "107": 50, "108": 10, "110": 5},
        "user_sparse": ["103", "104", "105", "109"], "user_multi": ["106", "107", "108", "110"], "multi_len": 8,
        "mm_dims": [32], "sid_vocab": [257, 257, 257], "n_actions": n_actions, "max_len": 100, "time_origin": 0,
    }
    preset = load_preset("default", {"train": {"batch_negatives": batch_negatives}} if batch_negatives is not None else None)
    model_settings = resolve_model_settings(preset.model, preset.train, meta)
    cfg = EncoderConfig.from_meta(meta, **model_settings)
    model = Encoder(cfg)
    rows = n_items + 1
    tables = ItemTables(
        feats=torch.from_numpy(rng.integers(0, 20, (rows, 4), dtype=np.int32)),
        mm=[torch.from_numpy(rng.standard_normal((rows, 32), dtype=np.float32))],
        mm_mask=torch.ones(rows, 1, dtype=torch.bool),
        sids=torch.from_numpy(rng.integers(1, 257, (rows, 3), dtype=np.int32)),
    )
    model.attach(tables)
    optimizers = make_optimizers(model, preset.train)
    B, L = 256, 100
    spec = NegativeSpec(batch_items=preset.train.batch_negatives, sampled=preset.train.sampled_negatives)
    started = None
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()  # the first step allocates the optimizer state
        items = rng.integers(1, rows, (B, L))
        distinct = np.unique(items)
        if len(distinct) > spec.batch_items:
            distinct = np.sort(rng.choice(distinct, spec.batch_items, replace=False))
        neg = np.unique(np.concatenate([distinct, rng.integers(1, rows, spec.sampled)]))
        batch = {
            "items": torch.from_numpy(items), "actions": torch.from_numpy(rng.integers(0, n_actions, (B, L))),
            "times": torch.from_numpy(np.cumsum(rng.integers(1, 3600, (B, L)), axis=1)),
            "user_sparse": torch.from_numpy(rng.integers(0, 3, (B, 4))),
            "user_multi": torch.from_numpy(rng.integers(0, 3, (B, 4, 8))),
            "weights": torch.ones(B, L), "pos_logq": torch.zeros(B, L), "neg_items": torch.from_numpy(neg),
            "neg_logq": torch.zeros(len(neg)), "loss_scale": torch.tensor(1.0 / (B * L)),
        }
        loss, _ = model(batch)
        loss.backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    id_rows = model.item_id.weight.shape[0]
    print(json.dumps({
        "track": track, "items": n_items, "batch_negatives": spec.batch_items, "sampled_negatives": spec.sampled,
        "loss": cfg.loss, "id_buckets": cfg.id_buckets, "id_table_rows": id_rows,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "id_table_with_adam_gb": round(3 * 4 * id_rows * cfg.d_model / 2**30, 2),
        "steps_per_s": round(steps / seconds, 2), "sequences_per_s": round(steps * B / seconds, 1),
        "peak_rss_gb": round(_peak_rss_gb(), 2),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracks", default="1M,10M")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-negatives", type=int, default=None, help="override the preset's batch_negatives")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.batch_negatives)
        return
    repo = Path(__file__).resolve().parents[1]
    for track in args.tracks.split(","):
        extra = ["--batch-negatives", str(args.batch_negatives)] if args.batch_negatives is not None else []
        done = subprocess.run([sys.executable, __file__, "--child", track, "--steps", str(args.steps), *extra], cwd=repo,
                              capture_output=True, text=True, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
        print(done.stdout.strip() or done.stderr[-2000:])


if __name__ == "__main__":
    main()
