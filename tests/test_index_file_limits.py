"""A saved index whose header declares more than the file holds: refused before faiss allocates it."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from models.index_files import check_index_file
from models.index_spec import IndexSpec
from models.retrieval import build_index
from taac_dagster.steps.index import save_index

REPO = Path(__file__).resolve().parents[1]
HEADER = 4 + 33  # fourcc; d, ntotal, two dummies, is_trained, metric type (inner product: no argument)

# Loads each folder in a fresh process and reports its error and how much its peak memory grew.
LOAD_EACH = """
import json, resource, sys
from models.index_files import load_index
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
errors = []
for folder in sys.argv[1:]:
    try:
        load_index(folder)
        errors.append(None)
    except Exception as error:
        errors.append(f"{type(error).__name__}: {error}")
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"errors": errors, "grown_mb": grown_mb}))
"""


def _saved(tmp_path: Path, kind: str) -> Path:
    vectors = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    index = build_index(vectors, np.arange(2000), IndexSpec(kind=kind, nlist=8) if kind == "ivf" else IndexSpec(kind=kind))
    return save_index(tmp_path / kind, index, {"checkpoint_version": "ckpt-1"})


def _patch(file: Path, offset: int, count: int, keep: int | None = None) -> None:
    data = bytearray(file.read_bytes())
    data[offset : offset + 8] = struct.pack("<Q", count)
    file.write_bytes(bytes(data[:keep]))


def test_indexes_save_index_writes_pass_the_check(tmp_path):
    for kind in ("flat", "ivf", "hnsw"):
        check_index_file(_saved(tmp_path, kind) / "index.faiss")


def test_sizes_past_the_end_of_the_file_are_refused_without_allocating(tmp_path):
    flat, ivf, hnsw = (_saved(tmp_path, kind) for kind in ("flat", "ivf", "hnsw"))
    # The file: 365 bytes whose vector count asks faiss for 1 GB (2**28 floats).
    _patch(flat / "index.faiss", HEADER, 2**28, keep=365)
    # One inverted list of 2**22 entries (300 MB of codes and ids) in a file of 70 KB.
    lists = (ivf / "index.faiss").read_bytes().index(b"ilar")
    _patch(ivf / "index.faiss", lists + 4 + 8 + 8 + 4 + 8, 2**22)
    # 2**25 HNSW level probabilities (256 MB of doubles).
    _patch(hnsw / "index.faiss", HEADER, 2**25)

    done = subprocess.run(
        [sys.executable, "-c", LOAD_EACH, str(flat), str(ivf), str(hnsw)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for folder, error in zip((flat, ivf, hnsw), report["errors"]):
        assert error and error.startswith("IndexMismatchError: "), error
        assert str(folder / "index.faiss") in error and "fit in the file" in error and "rebuild the index" in error
    assert report["grown_mb"] < 200, report
