"""Where the encoder's time goes: the default preset's query encoding (and training step) next
to a stock ``torch.nn.TransformerEncoder`` of the same shape, with achieved GFLOP/s against the
measured FP32 peak of this machine.

    .venv/bin/python benchmarks/bench_encoder.py                       # 8,192 users x 100 events, every core
    .venv/bin/python benchmarks/bench_encoder.py --threads 1 --users 4096 --profile

Measured, each as users (or sequences) per second:

- ``peak``: a 4096x256x256 FP32 matmul, the machine's practical FP32 peak at these threads
- ``stock``: ``nn.TransformerEncoder`` (pre-norm, d 64, 2 heads, feed-forward 128, ReLU,
  causal mask) over a ready ``[users, 101, 64]`` tensor: the backbone alone, no item tower
- ``encode``: ``Encoder.user_vectors`` of the default preset on the same histories: item
  tower (ids, sparse features, a 32-d multi-modal family, Semantic IDs), time features, user
  token, the blocks (last block for the last position only) and the query head
- ``train``: one training step of the default preset (forward + backward + optimizers, full
  softmax over the item rows) per sequence

FLOPs come from torch's FlopCounterMode (matmuls and attention); ``--profile`` prints the
operators that took the time in ``encode``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn
from flops import flops_of, measure_peak


def timed(fn, repeats: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def make_model(n_items: int, seed: int = 0):
    from models.auto_settings import resolve_model_settings
    from models.encoder import Encoder, ItemTables
    from models.encoder_config import EncoderConfig
    from taac_dagster.steps.training import load_preset

    rng = np.random.default_rng(seed)
    meta = {
        "num_item_rows": n_items + 1, "id_rows": n_items + 1, "item_vocab": [1000, 100, 50, 20], "num_events": 10**7,
        "user_vocab": {"103": 100, "104": 3, "105": 10, "109": 5, "106": 50, "107": 50, "108": 10, "110": 5},
        "user_sparse": ["103", "104", "105", "109"], "user_multi": ["106", "107", "108", "110"], "multi_len": 8,
        "mm_dims": [32], "sid_vocab": [257, 257, 257], "n_actions": 2, "max_len": 100, "time_origin": 0,
    }
    preset = load_preset("default")
    cfg = EncoderConfig.from_meta(meta, **resolve_model_settings(preset.model, preset.train, meta))
    model = Encoder(cfg)
    rows = n_items + 1
    model.attach(ItemTables(
        feats=torch.from_numpy(rng.integers(0, 20, (rows, 4), dtype=np.int32)),
        mm=[torch.from_numpy(rng.standard_normal((rows, 32), dtype=np.float32))],
        mm_mask=torch.from_numpy(rng.random((rows, 1)) < 0.8),
        sids=torch.from_numpy(rng.integers(1, 257, (rows, 3), dtype=np.int32)),
    ))
    return model, preset


def histories(n_users: int, n_items: int, length: int = 100, seed: int = 1) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {
        "items": torch.from_numpy(rng.integers(1, n_items + 1, (n_users, length))),
        "actions": torch.from_numpy(rng.integers(0, 2, (n_users, length))),
        "times": torch.from_numpy(np.cumsum(rng.integers(1, 7200, (n_users, length)), axis=1)),
        "user_sparse": torch.from_numpy(rng.integers(0, 3, (n_users, 4))),
        "user_multi": torch.from_numpy(rng.integers(0, 3, (n_users, 4, 8))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096, help="users per forward pass")
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--train-batch", type=int, default=256)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                        help="tuned: models/allocator.py's glibc settings, as the pipeline runs; default: glibc's own")
    args = parser.parse_args()
    if args.malloc == "tuned":
        from models.allocator import keep_freed_memory

        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    peak = measure_peak(threads)
    batch = histories(args.batch, args.items)

    model, preset = make_model(args.items)
    model.eval()
    d = model.cfg.d_model
    stock = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d, model.cfg.n_heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True),
        num_layers=model.cfg.n_layers, enable_nested_tensor=False,
    ).eval()
    x = torch.randn(args.batch, batch["items"].shape[1] + 1, d)
    causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
    repeats = max(1, args.users // args.batch)
    def stock_counted() -> None:
        # The eval fast path (one fused kernel) is invisible to FlopCounterMode: count the
        # same computation on the module path.
        stock.train()
        with torch.no_grad():
            stock(x, mask=causal, is_causal=True)
        stock.eval()

    count_fn = {"stock": stock_counted}
    figures = {"malloc": args.malloc, "threads": threads, "peak_gflops": round(peak, 1), "users": args.batch * repeats,
               "positions": x.shape[1]}
    with torch.no_grad():
        for name, fn in (
            ("stock", lambda: stock(x, mask=causal, is_causal=True)),
            ("encode", lambda: model.user_vectors(batch, (1,))),
        ):
            seconds = timed(fn, repeats)
            gflop = flops_of(count_fn.get(name, fn)) / 1e9
            figures[name] = {
                "users_per_s": round(args.batch / seconds, 1), "mflop_per_user": round(gflop / args.batch * 1e3, 3),
                "gflops": round(gflop / seconds, 1), "share_of_peak": round(gflop / seconds / peak, 3),
            }
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            model.user_vectors(batch, (1,))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))

    from models.batches import NegativeSpec
    from models.trainer import make_optimizers

    model.train()
    optimizers = make_optimizers(model, preset.train)
    B = args.train_batch
    train_batch = {k: v[:B] for k, v in batch.items()}
    train_batch.update(weights=torch.ones(B, x.shape[1] - 1), pos_logq=torch.zeros(B, x.shape[1] - 1),
                       loss_scale=torch.tensor(1.0 / (B * (x.shape[1] - 1))))
    if model.cfg.loss != "softmax":
        spec = NegativeSpec(sampled=preset.train.sampled_negatives)
        neg = torch.unique(torch.cat([train_batch["items"].reshape(-1)[: preset.train.batch_negatives],
                                      torch.randint(1, args.items + 1, (spec.sampled,))]))
        train_batch.update(neg_items=neg, neg_logq=torch.zeros(len(neg)))

    def step() -> None:
        loss, _ = model(train_batch)
        loss.backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)

    seconds = timed(step, 5)
    gflop = flops_of(lambda: model(train_batch)[0].backward()) / 1e9
    figures["train"] = {
        "loss": model.cfg.loss, "sequences_per_s": round(B / seconds, 1), "mflop_per_sequence": round(gflop / B * 1e3, 3),
        "gflops": round(gflop / seconds, 1), "share_of_peak": round(gflop / seconds / peak, 3),
    }
    figures["encode_vs_stock"] = round(figures["encode"]["users_per_s"] / figures["stock"]["users_per_s"], 3)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
