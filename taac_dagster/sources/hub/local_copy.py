"""The manifest of a download, and the verified local copy that stands in when the Hub cannot
be reached."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from taac_dagster.atomic import write_text_atomic
from taac_dagster.sources.hub.errors import is_unreachable
from taac_dagster.sources.hub.release import HF_DOWNLOAD_STATE, HubDownload, LogLike, hub_allow_patterns, local_files
from taac_dagster.sources.hub.verify import verify_download

MANIFEST_NAME = ".taac_hub_download.json"
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


def read_manifest(local_dir: Path) -> dict[str, Any] | None:
    path = local_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_manifest(
    download: HubDownload,
    families: Sequence[int],
    include_candidates: bool,
    sizes: Mapping[str, int],
    *,
    complete: bool,
    digests: Mapping[str, str] | None = None,
) -> None:
    """Record what local_dir holds. ``complete=False`` is written before files change, so a
    run killed half-way through an update is never mistaken for a complete copy offline."""
    record = {
        "repo_id": download.repo_id,
        "revision": download.revision,
        "commit_sha": download.commit_sha,
        "families": list(families),
        "include_candidates": include_candidates,
        "files": dict(sizes),
        "sha256": dict(digests or {}),
        "total_bytes": download.total_bytes,
        "complete": complete,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_text_atomic(download.local_dir / MANIFEST_NAME, json.dumps(record, indent=1, sort_keys=True))


def _commit_from_hf_metadata(local_dir: Path) -> str | None:
    """The commit huggingface_hub recorded for the files in local_dir, when they all agree.

    Each ``.cache/huggingface/download/<file>.metadata`` starts with the commit sha (format
    documented in huggingface_hub/_local_folder.py); a copy made by ``hf download`` without
    our manifest still carries it.
    """
    state = local_dir / HF_DOWNLOAD_STATE
    commits = set()
    for metadata in state.rglob("*.metadata") if state.is_dir() else ():
        try:
            first = metadata.read_text().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError):
            continue
        if _COMMIT_SHA.match(first):
            commits.add(first)
    return commits.pop() if len(commits) == 1 else None


def use_local_copy(
    error: BaseException,
    *,
    repo_id: str,
    revision: str,
    local_dir: Path,
    families: Sequence[int],
    include_candidates: bool,
    log: LogLike,
) -> tuple[HubDownload | None, str | None]:
    """(the verified local copy, None) when the Hub can't be reached, else (None, why not).

    This is what lets a re-run after a complete download work without the network.
    """
    if not is_unreachable(error):
        return None, None  # the Hub answered (no such repo/revision): a local copy can't stand in
    if not local_dir.is_dir() or not any(local_dir.iterdir()):
        return None, f"{local_dir} holds no earlier download"
    manifest = read_manifest(local_dir)
    refusal = None if manifest is None else _manifest_refusal(manifest, repo_id, local_dir, families, include_candidates)
    if refusal:
        return None, refusal
    recorded = manifest or {}
    expected = recorded["files"] if isinstance(recorded.get("files"), dict) else None
    digests = recorded["sha256"] if isinstance(recorded.get("sha256"), dict) else None
    commit = recorded.get("commit_sha") or _commit_from_hf_metadata(local_dir)
    pinned = bool(_COMMIT_SHA.match(revision))
    if pinned and commit is not None and commit != revision:
        return None, f"{local_dir} holds commit {commit}, not the pinned {revision}"
    problems = verify_download(
        local_dir, families, expected=expected, digests=digests, include_candidates=include_candidates
    )
    if problems:
        return None, f"the copy in {local_dir} is incomplete: {'; '.join(problems[:10])}"
    files = local_files(local_dir, hub_allow_patterns(families, include_candidates=include_candidates))
    moved = "" if pinned else f"; branch {revision!r} may have moved since"
    log.warning(
        f"Hub unreachable ({type(error).__name__}: {error}); using the verified local copy of "
        f"{repo_id} in {local_dir} (commit {commit or 'unknown'}{moved})"
    )
    download = HubDownload(
        repo_id=repo_id,
        revision=revision,
        commit_sha=commit or (revision if pinned else None),
        local_dir=local_dir,
        files=list(files),
        total_bytes=sum(files.values()),
        used_local_copy=True,
    )
    return download, None


def _manifest_refusal(
    manifest: dict[str, Any], repo_id: str, local_dir: Path, families: Sequence[int], include_candidates: bool
) -> str | None:
    """Why the manifest rules the copy out (another repo, an unfinished download, families or
    candidates never fetched), or None."""
    if manifest.get("repo_id") != repo_id:
        return f"{local_dir} holds a copy of {manifest.get('repo_id')!r}, not {repo_id!r}"
    if manifest.get("complete") is not True:
        return f"the download of commit {manifest.get('commit_sha')} into {local_dir} did not finish; reconnect to finish it"
    never = sorted(set(families) - set(manifest.get("families") or []))
    if never:
        return f"embedding families {never} were never completely downloaded into {local_dir}"
    if include_candidates and not manifest.get("include_candidates", True):
        return f"candidate/ was never downloaded into {local_dir}"
    return None
