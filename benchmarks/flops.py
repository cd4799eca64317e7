"""Shared by the benchmarks: the machine's measured FP32 peak and a FLOP counter, so every
throughput figure can be printed next to its achieved GFLOP/s and share of that peak."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def measure_peak(threads: int | None = None, n: int = 4096, k: int = 256, repeats: int = 20) -> float:
    """FP32 GFLOP/s of a [n, k] x [k, k] matmul (the best of ``repeats``) at ``threads``."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        # Into a preallocated output: the peak of the arithmetic, not of the allocator.
        a, b, out = torch.randn(n, k), torch.randn(k, k), torch.empty(n, k)
        for _ in range(3):
            torch.mm(a, b, out=out)
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            best = max(best, 2 * n * k * k / (time.perf_counter() - t) / 1e9)
        return best
    finally:
        torch.set_num_threads(before)


def measure_cuda_bf16_peak(n: int = 8192, repeats: int = 10) -> float:
    """Achieved bf16 GFLOP/s: the mean of ``repeats`` [n, n] x [n, n] products on the GPU
    after three warm-ups (an H200 gives ~790 000)."""
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b, out=out)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b, out=out)
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def flops_of(fn: Callable[[], object]) -> float:
    """FLOPs torch's FlopCounterMode sees in ``fn`` (matmuls and attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def achieved(flop: float, seconds: float, peak_gflops: float) -> dict[str, float]:
    gflops = flop / max(seconds, 1e-12) / 1e9
    return {"gflops": round(gflops, 1), "share_of_peak": round(gflops / peak_gflops, 3)}
