"""What the release is: its required files, the patterns that select the core and the chosen
embedding families, and what a finished download (``HubDownload``) holds."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from taac_dagster.formats import EMBEDDING_FAMILY_DIMS

REPO_TYPE = "dataset"
REQUIRED_PARQUET_FOLDERS = ("seq", "user_feat", "item_feat")
CORE_PATTERNS = ("seq/*", "user_feat/*", "item_feat/*", "indexer.pkl", "README.md")
CANDIDATE_PATTERN = "candidate/*"
# huggingface_hub keeps per-file download state (and partial ``.incomplete`` files) here.
HF_DOWNLOAD_STATE = Path(".cache") / "huggingface" / "download"


class LogLike(Protocol):
    """What ``log`` needs: Dagster's context.log, a logging.Logger, or anything alike.

    Messages are formatted before the call, so a plain ``.info(text)`` is enough.
    """

    def info(self, msg: str) -> Any: ...

    def warning(self, msg: str) -> Any: ...


@dataclass(frozen=True)
class HubDownload:
    repo_id: str
    revision: str  # as asked: branch, tag or commit sha
    commit_sha: str | None  # resolved; None only for an offline copy with no recorded commit
    local_dir: Path
    files: list[str] = field(default_factory=list)  # posix paths relative to local_dir
    total_bytes: int = 0
    used_local_copy: bool = False  # True when the Hub was unreachable and a verified copy was used


def check_families(families: Sequence[int]) -> list[int]:
    chosen: list[int] = []
    for family in families:
        if isinstance(family, bool) or not isinstance(family, int) or family not in EMBEDDING_FAMILY_DIMS:
            known = ", ".join(str(f) for f in EMBEDDING_FAMILY_DIMS)
            raise ValueError(
                f"unknown embedding family {family!r}: the TencentGR release has families {known} "
                "(set TAAC_EMBEDDING_FAMILIES, e.g. '81' or '81,82')"
            )
        if family not in chosen:
            chosen.append(family)
    return chosen


def hub_allow_patterns(families: Sequence[int], *, include_candidates: bool = True) -> list[str]:
    """``allow_patterns`` for snapshot_download: the core files plus the chosen families.

    Family folders are matched as ``mm_emb/emb_<family>_*/*`` because the dimension in the
    folder name differs between releases (family 84 is 4096-d in 1M, 32-d in 10M).
    Patterns use fnmatch, where ``*`` also crosses ``/``.
    """
    patterns = list(CORE_PATTERNS)
    if include_candidates:
        patterns.append(CANDIDATE_PATTERN)
    patterns.extend(f"mm_emb/emb_{family}_*/*" for family in check_families(families))
    return patterns


def matches(path: str, patterns: Sequence[str]) -> bool:
    # Same rule as huggingface_hub.utils.filter_repo_objects (fnmatch on the posix path).
    return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)


def local_files(local_dir: Path, patterns: Sequence[str]) -> dict[str, int]:
    """Posix relative path -> size of the non-hidden files under local_dir matching patterns."""
    found: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(local_dir):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            relative = path.relative_to(local_dir).as_posix()
            if matches(relative, patterns):
                found[relative] = path.stat().st_size
    return dict(sorted(found.items()))


def listing_problems(listing: Mapping[str, int], families: Sequence[int]) -> list[str]:
    """Layout problems of the remote listing: catch a wrong repo before fetching anything."""
    problems = [
        f"no {folder}/*.parquet files"
        for folder in REQUIRED_PARQUET_FOLDERS
        if not any(fnmatch.fnmatch(path, f"{folder}/*.parquet") for path in listing)
    ]
    if "indexer.pkl" not in listing:
        problems.append("no indexer.pkl")
    for family in families:
        if not any(fnmatch.fnmatch(path, f"mm_emb/emb_{family}_*/*.parquet") for path in listing):
            problems.append(f"no mm_emb/emb_{family}_<dim>_parquet/ files (embedding family {family})")
    return problems
