"""Content fingerprints of a raw dataset folder, used as the raw data's Dagster DataVersion.

The digest depends only on relative paths, sizes and bytes, never on mtimes or absolute
locations, so two copies of the same release fingerprint the same and a re-download that
changes nothing does not make downstream assets stale.

Trade-off: files up to ``full_hash_limit`` are hashed completely; larger files are hashed by
size plus three 4 MiB windows (head, middle, tail) and marked ``sampled``. The 1M Hub release
is ~137 GB, and re-reading all of it on every run would cost minutes to hours of I/O. A
same-size edit outside the sampled windows of a large file goes unnoticed; for Hub downloads
the resolved commit sha (recorded beside the fingerprint) covers that case, since a Hub
commit is immutable.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CHUNK_SIZE = 8 * 2**20
SAMPLE_WINDOW = 4 * 2**20
DEFAULT_FULL_HASH_LIMIT = 256 * 2**20


@dataclass(frozen=True)
class Fingerprint:
    digest: str  # hex sha256 over the sorted (relative path, size, per-file digest) list
    files: list[dict[str, Any]] = field(default_factory=list)  # path, size, digest, mode
    total_bytes: int = 0

    @property
    def sampled_files(self) -> int:
        return sum(1 for entry in self.files if entry["mode"] == "sampled")


def _is_hidden(relative: Path) -> bool:
    # Names starting with '.' are our atomic-write temps (.x.tmp-*), huggingface_hub's
    # local_dir metadata (.cache/huggingface) and our own download manifest: none is data.
    return any(part.startswith(".") for part in relative.parts)


def visible_files(root: Path) -> list[Path]:
    """Every file under ``root`` outside hidden names (see ``_is_hidden``), relative to it,
    sorted by path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune hidden folders so a 100 GB .cache of partial downloads is never walked.
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        found += [Path(dirpath, name).relative_to(root) for name in filenames if not name.startswith(".")]
    return sorted(found, key=Path.as_posix)


def _collect(root: Path, files: Iterable[Path] | None) -> list[tuple[str, Path]]:
    """(posix relative path, absolute path) for every file to hash, sorted, hidden ones out."""
    chosen: dict[str, Path] = {}
    if files is None:
        chosen = {relative.as_posix(): root / relative for relative in visible_files(root)}
    else:
        for given in files:
            path = Path(given)
            path = path if path.is_absolute() else root / path
            try:
                relative = path.relative_to(root)
            except ValueError:
                raise ValueError(f"{path} is not inside the fingerprinted folder {root}") from None
            if _is_hidden(relative):
                continue
            if not path.is_file():
                raise FileNotFoundError(f"cannot fingerprint {path}: not a file")
            chosen[relative.as_posix()] = path
    return sorted(chosen.items())


def _windows(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the head, middle and tail windows of a large file."""
    length = min(SAMPLE_WINDOW, size)
    offsets = (0, max(0, (size - length) // 2), max(0, size - length))
    return [(offset, length) for offset in offsets]


def _hash_file(path: Path, size: int, mode: Literal["full", "sampled"], progress: Any) -> str:
    hasher = hashlib.blake2b(digest_size=32)
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    with path.open("rb") as handle:
        if mode == "full":
            while True:
                read = handle.readinto(buffer)
                if not read:
                    break
                hasher.update(view[:read])
                if progress is not None:
                    progress.update(read)
        else:
            # The size goes in first so truncating or appending always changes the digest,
            # and the offsets too so the same bytes at another position differ.
            hasher.update(b"sampled:" + size.to_bytes(8, "little"))
            for offset, length in _windows(size):
                handle.seek(offset)
                chunk = handle.read(length)
                hasher.update(offset.to_bytes(8, "little") + chunk)
                if progress is not None:
                    progress.update(len(chunk))
    return hasher.hexdigest()


def fingerprint_tree(
    root: Path,
    files: Iterable[Path] | None = None,
    *,
    full_hash_limit: int = DEFAULT_FULL_HASH_LIMIT,
    progress: bool = False,
) -> Fingerprint:
    """Fingerprint every non-hidden file under ``root`` (or only ``files``, relative to it)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {root}: not a folder")
    entries = _collect(root, files)
    plan: list[tuple[str, Path, int, Literal["full", "sampled"]]] = []
    for relative, path in entries:
        size = path.stat().st_size
        plan.append((relative, path, size, "full" if size <= full_hash_limit else "sampled"))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        to_read = sum(
            size if mode == "full" else sum(length for _, length in _windows(size))
            for _, _, size, mode in plan
        )
        bar = tqdm(total=to_read, unit="B", unit_scale=True, desc=f"Fingerprinting {root.name}")

    records: list[dict[str, Any]] = []
    try:
        for relative, path, size, mode in plan:
            records.append(
                {"path": relative, "size": size, "digest": _hash_file(path, size, mode, bar), "mode": mode}
            )
    finally:
        if bar is not None:
            bar.close()

    overall = hashlib.sha256()
    for record in records:  # already sorted by path
        # One JSON array per line: unambiguous even for paths containing tabs or newlines.
        overall.update(json.dumps([record["path"], record["size"], record["digest"]]).encode())
        overall.update(b"\n")
    return Fingerprint(
        digest=overall.hexdigest(),
        files=records,
        total_bytes=sum(record["size"] for record in records),
    )
