"""models/allocator.py: glibc's mallopt is applied once per process."""

from __future__ import annotations

import os
import sys

import pytest

from models import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                    reason="mallopt is glibc's")
def test_keep_freed_memory_applies_once_on_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    assert allocator.keep_freed_memory() is True
    monkeypatch.setattr(allocator, "SETTINGS", {allocator.M_MMAP_THRESHOLD: -5})  # refused by glibc, never asked
    assert allocator.keep_freed_memory() is True
