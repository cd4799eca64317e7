"""``download_hub_dataset``: resolve the revision to a commit, check the listing and the free
space, fetch what is missing, verify, and record the manifest."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taac_dagster.errors import SourceUnavailableError
from taac_dagster.settings import HUB_DEADLINE_SECONDS, HUB_TIMEOUT_SECONDS
from taac_dagster.sources.hub.errors import catchable, explain
from taac_dagster.sources.hub.limits import TimeLimits, time_limits
from taac_dagster.sources.hub.local_copy import read_manifest, use_local_copy, write_manifest
from taac_dagster.sources.hub.release import (
    REPO_TYPE,
    HubDownload,
    LogLike,
    check_families,
    hub_allow_patterns,
    listing_problems,
    local_files,
    matches,
)
from taac_dagster.sources.hub.verify import remove_orphan_partials, verify_download

logger = logging.getLogger(__name__)


def _remote_listing(
    api: Any, repo_id: str, commit_sha: str, patterns: Sequence[str]
) -> tuple[dict[str, int], dict[str, str]]:
    """(path -> size, path -> sha256) of the commit's files the patterns select; the sha256 is
    known for files stored in Git LFS (the data files), from the Hub's tree listing."""
    from huggingface_hub.hf_api import RepoFile

    entries = api.list_repo_tree(repo_id, recursive=True, revision=commit_sha, repo_type=REPO_TYPE)
    files = [e for e in entries if isinstance(e, RepoFile) and matches(e.path, patterns)]
    sizes = dict(sorted((entry.path, entry.size) for entry in files))
    digests = {entry.path: lfs.sha256 for entry in files if (lfs := getattr(entry, "lfs", None)) and lfs.sha256}
    return sizes, dict(sorted(digests.items()))


@dataclass(frozen=True)
class _HubRequest:
    """What ``download_hub_dataset`` was asked for, shared by its steps."""

    repo_id: str
    revision: str
    local_dir: Path
    families: list[int]
    include_candidates: bool
    token: str | None
    endpoint: str | None
    max_workers: int
    log: LogLike
    limits: TimeLimits

    @property
    def patterns(self) -> list[str]:
        return hub_allow_patterns(self.families, include_candidates=self.include_candidates)

    def fail_or_local(self, error: BaseException, stage: str) -> HubDownload:
        """A verified local copy when the Hub fails, else ``SourceUnavailableError`` saying why
        and how to fix it (``transient`` when a retry may succeed: the network, HTTP 5xx / 429)."""
        local, why_not = use_local_copy(
            error, repo_id=self.repo_id, revision=self.revision, local_dir=self.local_dir, families=self.families,
            include_candidates=self.include_candidates, log=self.log,
        )
        if local is not None:
            return local
        message, transient = explain(error, self.repo_id, self.revision, self.endpoint, stage, self.limits.timeout)
        if why_not:
            message += f" No local fallback: {why_not}."
        raise SourceUnavailableError(message, transient=transient) from error


def download_hub_dataset(
    repo_id: str,
    revision: str,
    local_dir: Path,
    families: Sequence[int],
    *,
    token: str | None = None,
    max_workers: int = 8,
    log: LogLike | None = None,
    include_candidates: bool = True,
    endpoint: str | None = None,
    timeout: float = HUB_TIMEOUT_SECONDS,
    deadline: float = HUB_DEADLINE_SECONDS,
) -> HubDownload:
    """Download (or resume, or re-verify) the release into ``local_dir`` and verify it.

    Raises SourceUnavailableError naming the repo, the revision, the failure and the fix,
    unless the Hub is unreachable and ``local_dir`` already holds a complete copy, which is
    then used with a warning. ``endpoint`` overrides HF_ENDPOINT (mirrors, tests). ``timeout``
    bounds each request's waits and ``deadline`` the whole call, in seconds.
    """
    request = _HubRequest(
        repo_id=repo_id, revision=revision, local_dir=Path(local_dir), families=check_families(families),
        include_candidates=include_candidates, token=token, endpoint=endpoint, max_workers=max_workers,
        log=log or logger, limits=TimeLimits.starting_now(timeout, deadline),
    )
    with time_limits(request.limits):
        return _download(request)


def _download(request: _HubRequest) -> HubDownload:
    from huggingface_hub import HfApi

    resolved = _resolve_release(request, HfApi(endpoint=request.endpoint, token=request.token))
    if isinstance(resolved, HubDownload):  # the Hub failed; a verified local copy is used
        return resolved
    commit_sha, expected, digests = resolved
    _check_release_layout(request, commit_sha, expected)
    to_fetch = _check_free_space(request, commit_sha, expected)
    download = HubDownload(
        repo_id=request.repo_id,
        revision=request.revision,
        commit_sha=commit_sha,
        local_dir=request.local_dir,
        files=list(expected),
        total_bytes=sum(expected.values()),
    )
    _start_manifest(request, download, expected, digests, complete_on_disk=to_fetch == 0)
    fallback = _fetch_and_verify(request, commit_sha, expected, digests)
    if fallback is not None:
        return fallback
    write_manifest(download, request.families, request.include_candidates, expected, complete=True, digests=digests)
    request.log.info(
        f"Hub {request.repo_id} at commit {commit_sha} verified in {request.local_dir} ({len(expected)} files, "
        f"{len(digests)} by sha256)"
    )
    return download


def _resolve_release(request: _HubRequest, api: Any) -> tuple[str, dict[str, int], dict[str, str]] | HubDownload:
    """The commit the revision names and its file listing (sizes, sha256), or the local
    fallback when the Hub cannot be asked. Resolving first means the download takes that exact
    commit: a branch that moves mid-download cannot mix files of two commits."""
    try:
        info = api.dataset_info(request.repo_id, revision=request.revision, timeout=request.limits.timeout)
        commit_sha = info.sha
        if not commit_sha:
            raise SourceUnavailableError(f"the Hub returned no commit sha for {request.repo_id!r} at {request.revision!r}")
        expected, digests = _remote_listing(api, request.repo_id, commit_sha, request.patterns)
    except catchable() as error:
        return request.fail_or_local(error, "resolve")
    return commit_sha, expected, digests


def _check_release_layout(request: _HubRequest, commit_sha: str, expected: Mapping[str, int]) -> None:
    """A wrong repo or revision shows in the listing: say so before a single byte moves."""
    remote_problems = listing_problems(expected, request.families)
    if remote_problems:
        raise SourceUnavailableError(
            f"Hub dataset {request.repo_id!r} at revision {request.revision!r} (commit {commit_sha}) does not have the "
            f"expected release layout (format A of docs/domain.md): {'; '.join(remote_problems)}. "
            "Check TAAC_HUB_REPO_ID / TAAC_HUB_REVISION and TAAC_EMBEDDING_FAMILIES."
        )


def _check_free_space(request: _HubRequest, commit_sha: str, expected: Mapping[str, int]) -> int:
    """Bytes still to fetch (files already complete are not fetched again); they must fit on the disk."""
    request.local_dir.mkdir(parents=True, exist_ok=True)
    present = local_files(request.local_dir, request.patterns)
    to_fetch = sum(size for path, size in expected.items() if present.get(path) != size)
    free = shutil.disk_usage(request.local_dir).free
    request.log.info(
        f"Hub {request.repo_id}@{request.revision} (commit {commit_sha}): {len(expected)} files, "
        f"{sum(expected.values()) / 1e9:.2f} GB, {to_fetch / 1e9:.2f} GB still to fetch into "
        f"{request.local_dir} ({free / 1e9:.1f} GB free)"
    )
    if to_fetch > free:
        raise SourceUnavailableError(
            f"cannot download Hub dataset {request.repo_id!r} at revision {request.revision!r}: {to_fetch / 1e9:.1f} GB "
            f"still to fetch but only {free / 1e9:.1f} GB free in {request.local_dir}. Free space, choose "
            "another TAAC_DATA_ROOT, or fetch fewer embedding families (TAAC_EMBEDDING_FAMILIES=81)."
        )
    return to_fetch


def _start_manifest(
    request: _HubRequest, download: HubDownload, expected: dict[str, int], digests: dict[str, str], *, complete_on_disk: bool
) -> None:
    """Mark the copy incomplete until it is verified, unless it already is exactly this commit."""
    manifest = read_manifest(request.local_dir)
    unchanged = (
        complete_on_disk
        and manifest is not None
        and manifest.get("complete") is True
        and manifest.get("commit_sha") == download.commit_sha
        and manifest.get("files") == expected
        and manifest.get("sha256", {}) == digests
    )
    if not unchanged:
        write_manifest(download, request.families, request.include_candidates, expected, complete=False, digests=digests)


def _fetch_and_verify(
    request: _HubRequest, commit_sha: str, expected: dict[str, int], digests: dict[str, str]
) -> HubDownload | None:
    """snapshot_download what is missing, then check every file's size and sha256. A file that
    fails its sha256 is removed by the check, and one more download fetches it. Returns the
    local fallback when the Hub fails mid-way, None when the copy is complete."""
    from huggingface_hub import snapshot_download

    for attempt in range(2):
        try:
            snapshot_download(
                repo_id=request.repo_id,
                repo_type=REPO_TYPE,
                revision=commit_sha,
                allow_patterns=request.patterns,
                local_dir=request.local_dir,
                token=request.token,
                max_workers=request.max_workers,
                endpoint=request.endpoint,
                etag_timeout=request.limits.timeout,
            )
        except catchable() as error:
            # A connection lost mid-way: finished files stay, the next run fetches the rest.
            return request.fail_or_local(error, "download")

        orphans = remove_orphan_partials(request.local_dir, request.patterns)
        if orphans:
            request.log.info(f"Removed {orphans} partial download(s) left by an interrupted earlier run")
        problems = verify_download(
            request.local_dir, request.families, expected=expected, digests=digests,
            include_candidates=request.include_candidates,
        )
        corrupt = [p for p in problems if "does not match the release" in p]
        if not corrupt or attempt:
            break
        request.log.warning(
            f"{len(corrupt)} file(s) did not match their sha256 and were removed; fetching them again: {corrupt[:3]}"
        )
    if problems:
        raise SourceUnavailableError(
            f"Hub dataset {request.repo_id!r} at revision {request.revision!r} (commit {commit_sha}) downloaded into "
            f"{request.local_dir} but the copy is incomplete: {'; '.join(problems)}. Re-run to fetch the rest, or "
            "delete the folder to start over."
        )
    return None
