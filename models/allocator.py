"""glibc malloc tuned for tensor work: freed memory is kept for reuse, not handed back.

PyTorch's CPU tensors come from malloc. By default glibc serves a large block (above a
threshold that grows to 32 MiB at most) with fresh pages from mmap and returns it to the kernel
on free, and trims the top of the heap as soon as 128 KiB or so sit free there. A forward pass
allocates and frees activations of tens to hundreds of MiB each step (a batch of 4,096 users x
101 tokens x 192 floats is 317 MiB), so every step pays the kernel for zeroed pages and their
first-touch faults again: measured on this 2-core machine (benchmarks/bench_encoder.py), the
encoder ran at half its speed. Raising the mmap threshold to 1 GiB and the trim threshold out of
reach makes freed blocks come back from the heap on the next step (2.2x query encoding, 1.5x
training steps; the same for a stock ``nn.TransformerEncoder``).

The cost: memory a step freed stays in the process (its peak RSS is what it was; it does not go
down between steps). Every stage that runs the encoder calls ``keep_freed_memory`` once; it is a
no-op off glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>
SETTINGS = {M_MMAP_THRESHOLD: 1 << 30, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 64 << 20}

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply ``SETTINGS`` through glibc's ``mallopt`` (once per process); True when applied."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux"):
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):  # not glibc
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = all(mallopt(option, value) == 1 for option, value in SETTINGS.items())
    return _applied


__all__ = ["keep_freed_memory"]
