"""Whether a local folder is a complete, uncorrupted copy of the release: required files, sizes,
partial downloads, and the sha256 of every Git LFS file (remembered once checked)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from taac_dagster.atomic import write_text_atomic
from taac_dagster.formats import hub_embedding_dirs
from taac_dagster.sources.hub.release import (
    HF_DOWNLOAD_STATE,
    REQUIRED_PARQUET_FOLDERS,
    check_families,
    hub_allow_patterns,
    local_files,
    matches,
)

VERIFIED_NAME = ".taac_hub_verified.json"  # path -> [size, mtime_ns, ctime_ns, sha256] of files already hashed


def _parquet_problem(folder: Path, label: str) -> str | None:
    if not folder.is_dir():
        return f"{label}/ is missing"
    if not any(p.is_file() and not p.name.startswith(".") for p in folder.glob("*.parquet")):
        return f"{label}/ has no parquet files"
    return None


def _leftover_partials(local_dir: Path, patterns: Sequence[str]) -> list[str]:
    """Partial downloads (``*.incomplete``) that belong to files the patterns ask for.

    huggingface_hub names a partial file by a hash, inside a folder mirroring the file's
    folder, so only the folder tells which file it was. Partials of families not asked for
    this time (an earlier, interrupted run) are left alone: they never block this download.
    """
    state = local_dir / HF_DOWNLOAD_STATE
    if not state.is_dir():
        return []
    leftovers = []
    for partial in sorted(state.rglob("*.incomplete")):
        parent = partial.parent.relative_to(state).as_posix()
        if parent in ("", ".") or matches(f"{parent}/file", patterns):
            leftovers.append(partial.relative_to(local_dir).as_posix())
    return leftovers


def remove_orphan_partials(local_dir: Path, patterns: Sequence[str]) -> int:
    """Delete partial downloads left beside files snapshot_download has just completed.

    Called only after snapshot_download returned, i.e. every requested file is in place: a
    partial still lying there belongs to an earlier run that was killed (huggingface_hub
    deletes its own on ordinary errors) and will never be used. Left alone, it would make
    verify_download fail on every later run.
    """
    removed = 0
    for relative in _leftover_partials(local_dir, patterns):
        (local_dir / relative).unlink(missing_ok=True)
        removed += 1
    return removed


def verify_download(
    local_dir: Path,
    families: Sequence[int],
    *,
    expected: Mapping[str, int] | None = None,
    digests: Mapping[str, str] | None = None,
    include_candidates: bool = True,
) -> list[str]:
    """Problems that make ``local_dir`` an incomplete Hub copy; an empty list means complete.

    ``digests`` (relative path -> sha256, the Hub's LFS metadata) verifies the content of each
    of those files; a file that does not match is removed (the next download fetches it) and
    named in the problems.

    ``expected`` (relative path -> size, e.g. the Hub listing for the commit) adds a
    file-by-file check: missing files, wrong sizes, and extra files that a reader globbing
    ``seq/*.parquet`` would otherwise read as part of the release. ``candidate/`` is never
    required (only ``expected`` can ask for its files); ``include_candidates=False`` leaves
    it out of the file-by-file check too.
    """
    local_dir = Path(local_dir)
    chosen = check_families(families)
    if not local_dir.is_dir():
        return [f"{local_dir} does not exist"]
    patterns = hub_allow_patterns(chosen, include_candidates=include_candidates)
    problems = _layout_problems(local_dir, chosen)
    present = local_files(local_dir, patterns)
    # No valid parquet or pickle file is zero bytes long: an empty one is a failed write.
    problems.extend(f"{path} is empty (0 bytes)" for path, size in present.items() if size == 0)
    if expected is not None:
        problems.extend(_listing_mismatches(present, expected, patterns))
    problems.extend(
        f"{partial} is a partial download left by an interrupted run; re-run the download to finish it"
        for partial in _leftover_partials(local_dir, patterns)
    )
    if digests:
        problems.extend(_digest_problems(local_dir, {p: d for p, d in digests.items() if p in present and d}))
    return problems


def _layout_problems(local_dir: Path, families: Sequence[int]) -> list[str]:
    """What the release needs and ``local_dir`` lacks: the parquet folders, a non-empty indexer,
    a parquet folder per chosen embedding family."""
    problems: list[str] = []
    for name in REQUIRED_PARQUET_FOLDERS:
        problem = _parquet_problem(local_dir / name, name)
        if problem:
            problems.append(problem)
    indexer = local_dir / "indexer.pkl"
    if not indexer.is_file():
        problems.append("indexer.pkl is missing")
    elif indexer.stat().st_size == 0:
        problems.append("indexer.pkl is empty")
    embedding_dirs = hub_embedding_dirs(local_dir)
    for family in families:
        if family not in embedding_dirs:
            problems.append(f"mm_emb/emb_{family}_<dim>_parquet/ is missing (embedding family {family})")
            continue
        folder = embedding_dirs[family][1]
        problem = _parquet_problem(folder, folder.relative_to(local_dir).as_posix())
        if problem:
            problems.append(f"{problem} (embedding family {family})")
    return problems


def _listing_mismatches(present: Mapping[str, int], expected: Mapping[str, int], patterns: Sequence[str]) -> list[str]:
    """File by file against the listing: missing files, wrong sizes, files not in the release."""
    problems: list[str] = []
    wanted = {path: size for path, size in expected.items() if matches(path, patterns)}
    for path, size in wanted.items():
        if path not in present:
            problems.append(f"{path} is missing")
        elif size is not None and present[path] != size:
            problems.append(f"{path} has {present[path]} bytes, the release has {size}")
    problems.extend(
        f"{path} is not part of the release (left from another version?); remove it"
        for path in present
        if path not in wanted
    )
    return problems


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_problems(local_dir: Path, digests: Mapping[str, str]) -> list[str]:
    """Files whose sha256 is not the release's (each removed); hashes are remembered by size,
    mtime and ctime, so a file is rehashed only after it was written to."""
    cache_path = local_dir / VERIFIED_NAME
    try:
        cache = json.loads(cache_path.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    problems = []
    for relative, wanted in sorted(digests.items()):
        path = local_dir / relative
        stat = path.stat()
        # ctime too: it changes on every write and cannot be set back (os.utime sets mtime only).
        key = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
        known = cache.get(relative)
        if isinstance(known, list) and known[:3] == key:
            found = known[3]
        else:
            found = file_sha256(path)
            cache[relative] = [*key, found]
        if found != wanted:
            path.unlink()
            cache.pop(relative, None)
            problems.append(
                f"{relative} does not match the release (sha256 {found[:12]}..., the Hub lists {wanted[:12]}...): "
                "it was removed; re-run to fetch it again"
            )
    write_text_atomic(cache_path, json.dumps(cache, indent=0, sort_keys=True))
    return problems
