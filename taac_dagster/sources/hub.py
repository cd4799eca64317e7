"""Fetch the TencentGR release from the Hugging Face Hub (the Parquet release, format A of docs/domain.md).

Only the files the run needs are fetched: the ~2 GB core (sequences, features, candidates,
indexer) plus the embedding families asked for, not the 137 GB of all six families. With the
families on auto (``TAAC_EMBEDDING_FAMILIES`` unset) that is family 81 alone
(``formats.DEFAULT_FETCH_FAMILIES``); the warehouse then reads every family the copy holds.

Downloads go straight into ``local_dir`` through ``huggingface_hub.snapshot_download``, which
draws its own tqdm bars. Re-running after an interruption keeps every finished file (checked
against ``local_dir/.cache/huggingface/download/*.metadata``) and fetches only the rest. A
file cut off mid-way is resumed with an HTTP Range request while the process lives. Across
runs it depends on the huggingface_hub version: older releases reuse
``<hash>.<etag>.incomplete`` and resume it; 2.x writes process-unique temp files
(huggingface_hub PR #4228) and restarts that one file. After each download the
folder is verified and a manifest (``MANIFEST_NAME``) records the repo, the resolved commit
and the expected files, so a later run can verify and use a complete copy without the network.

Every file stored in Git LFS (the parquet parts and ``indexer.pkl``) is verified by the sha256
the Hub lists for it, not only by its size: a same-size corrupt or stale file is removed and
fetched again. Hashes already checked are remembered (``VERIFIED_NAME``: size, mtime, ctime
and digest per file), so a re-run rehashes only files written since, not the whole release.

Every Hub request waits at most ``timeout`` seconds to connect or for the next bytes of its answer,
and the whole fetch stops at ``deadline`` seconds (``hub_timeout_seconds``, ``hub_deadline_seconds``):
the caller holds the track's lock meanwhile, and huggingface_hub sets no timeout on some calls.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from taac_dagster.atomic import write_text_atomic
from taac_dagster.errors import SourceUnavailableError
from taac_dagster.formats import EMBEDDING_FAMILY_DIMS, hub_embedding_dirs
from taac_dagster.settings import HUB_DEADLINE_SECONDS, HUB_TIMEOUT_SECONDS

logger = logging.getLogger(__name__)

REPO_TYPE = "dataset"
MANIFEST_NAME = ".taac_hub_download.json"
VERIFIED_NAME = ".taac_hub_verified.json"  # path -> [size, mtime_ns, ctime_ns, sha256] of files already hashed
REQUIRED_PARQUET_FOLDERS = ("seq", "user_feat", "item_feat")
CORE_PATTERNS = ("seq/*", "user_feat/*", "item_feat/*", "indexer.pkl", "README.md")
CANDIDATE_PATTERN = "candidate/*"
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# huggingface_hub keeps per-file download state (and partial ``.incomplete`` files) here.
_HF_DOWNLOAD_STATE = Path(".cache") / "huggingface" / "download"


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


# --- patterns ------------------------------------------------------------------------------


def _check_families(families: Sequence[int]) -> list[int]:
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
    patterns.extend(f"mm_emb/emb_{family}_*/*" for family in _check_families(families))
    return patterns


def _matches(path: str, patterns: Sequence[str]) -> bool:
    # Same rule as huggingface_hub.utils.filter_repo_objects (fnmatch on the posix path).
    return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)


# --- verification --------------------------------------------------------------------------


def _local_files(local_dir: Path, patterns: Sequence[str]) -> dict[str, int]:
    """Posix relative path -> size of the non-hidden files under local_dir matching patterns."""
    found: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(local_dir):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            relative = path.relative_to(local_dir).as_posix()
            if _matches(relative, patterns):
                found[relative] = path.stat().st_size
    return dict(sorted(found.items()))


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
    state = local_dir / _HF_DOWNLOAD_STATE
    if not state.is_dir():
        return []
    leftovers = []
    for partial in sorted(state.rglob("*.incomplete")):
        parent = partial.parent.relative_to(state).as_posix()
        if parent in ("", ".") or _matches(f"{parent}/file", patterns):
            leftovers.append(partial.relative_to(local_dir).as_posix())
    return leftovers


def _remove_orphan_partials(local_dir: Path, patterns: Sequence[str]) -> int:
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
    chosen = _check_families(families)
    if not local_dir.is_dir():
        return [f"{local_dir} does not exist"]
    patterns = hub_allow_patterns(chosen, include_candidates=include_candidates)
    problems: list[str] = []
    for folder in REQUIRED_PARQUET_FOLDERS:
        problem = _parquet_problem(local_dir / folder, folder)
        if problem:
            problems.append(problem)
    indexer = local_dir / "indexer.pkl"
    if not indexer.is_file():
        problems.append("indexer.pkl is missing")
    elif indexer.stat().st_size == 0:
        problems.append("indexer.pkl is empty")
    embedding_dirs = hub_embedding_dirs(local_dir)
    for family in chosen:
        if family not in embedding_dirs:
            problems.append(f"mm_emb/emb_{family}_<dim>_parquet/ is missing (embedding family {family})")
            continue
        folder = embedding_dirs[family][1]
        problem = _parquet_problem(folder, folder.relative_to(local_dir).as_posix())
        if problem:
            problems.append(f"{problem} (embedding family {family})")

    present = _local_files(local_dir, patterns)
    # No valid parquet or pickle file is zero bytes long: an empty one is a failed write.
    problems.extend(f"{path} is empty (0 bytes)" for path, size in present.items() if size == 0)
    if expected is not None:
        wanted = {path: size for path, size in expected.items() if _matches(path, patterns)}
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
    problems.extend(
        f"{partial} is a partial download left by an interrupted run; re-run the download to finish it"
        for partial in _leftover_partials(local_dir, patterns)
    )
    if digests:
        problems.extend(_digest_problems(local_dir, {p: d for p, d in digests.items() if p in present and d}))
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


# --- manifest of a completed download ------------------------------------------------------


def _read_manifest(local_dir: Path) -> dict[str, Any] | None:
    path = local_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_manifest(
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
    state = local_dir / _HF_DOWNLOAD_STATE
    commits = set()
    for metadata in state.rglob("*.metadata") if state.is_dir() else ():
        try:
            first = metadata.read_text().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError):
            continue
        if _COMMIT_SHA.match(first):
            commits.add(first)
    return commits.pop() if len(commits) == 1 else None


# --- errors --------------------------------------------------------------------------------


def _hub_errors() -> dict[str, type[BaseException]]:
    try:  # huggingface_hub >= 0.24
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - older releases export them from utils
        from huggingface_hub import utils as hf_errors  # type: ignore[no-redef]
    names = (
        "RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError", "LocalEntryNotFoundError",
        "OfflineModeIsEnabled", "HfHubHTTPError", "XetDownloadError",
    )
    return {name: getattr(hf_errors, name) for name in names if hasattr(hf_errors, name)}


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection / timeout errors of whichever HTTP client this huggingface_hub uses.

    huggingface_hub < 1.0 uses requests (its errors are OSErrors already), 1.x httpx and
    2.x httpx2, whose ``RequestError`` is not an OSError and escapes HfApi calls unwrapped.
    """
    found: list[type[BaseException]] = [OSError, TimeoutError]
    for module_name in ("httpx2", "httpx"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        if isinstance(getattr(module, "RequestError", None), type):
            found.append(module.RequestError)
    return tuple(found)


def _timeout_errors() -> tuple[type[BaseException], ...]:
    """A request that got no answer in time, whichever HTTP client raised it."""
    found: list[type[BaseException]] = [TimeoutError]
    for module_name in ("httpx2", "httpx"):
        module = sys.modules.get(module_name)
        if isinstance(getattr(module, "TimeoutException", None), type):
            found.append(module.TimeoutException)
    return tuple(found)


def _catchable() -> tuple[type[BaseException], ...]:
    return tuple(_hub_errors().values()) + _transport_errors()


def _status_code(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _is_local_os_error(error: BaseException) -> bool:
    """A failure of this machine (disk full, permission, read-only folder), not of the Hub."""
    hub_classes = tuple(_hub_errors().values())
    return (
        isinstance(error, OSError)
        and error.errno is not None
        and not isinstance(error, (ConnectionError, TimeoutError) + hub_classes)
    )


def _is_unreachable(error: BaseException) -> bool:
    """True when the Hub could not be asked (offline, network, outage), not when it said no."""
    if _is_local_os_error(error):
        return False
    hub = _hub_errors()
    refusal = tuple(hub[name] for name in ("RepositoryNotFoundError", "RevisionNotFoundError") if name in hub)
    if refusal and isinstance(error, refusal):
        return False
    if "HfHubHTTPError" in hub and isinstance(error, hub["HfHubHTTPError"]):
        code = _status_code(error)
        return code is None or code >= 500 or code == 429
    return isinstance(error, _catchable())


def _explain(
    error: BaseException, repo_id: str, revision: str, endpoint: str | None, stage: str, timeout: float | None = None
) -> tuple[str, bool]:
    """What went wrong and how to fix it, and whether a retry may succeed (the network, the
    Hub's own errors) or not (a wrong name, a token, the disk, offline mode)."""
    from huggingface_hub import constants

    hub = _hub_errors()
    where = endpoint or constants.ENDPOINT
    fallback = "or set TAAC_SOURCE=local with TAAC_LOCAL_PATH pointing at an existing copy of the release"
    offline_cls = hub.get("OfflineModeIsEnabled")
    cause = error.__cause__ or error.__context__
    transient = False
    if "RevisionNotFoundError" in hub and isinstance(error, hub["RevisionNotFoundError"]):
        what = f"revision {revision!r} does not exist in the Hub dataset {repo_id!r}"
        todo = f"set TAAC_HUB_REVISION to an existing branch, tag or commit sha, {fallback}"
    elif "GatedRepoError" in hub and isinstance(error, hub["GatedRepoError"]):
        what = f"the Hub dataset {repo_id!r} is gated and this token has no access"
        todo = f"accept its terms on the Hub and set TAAC_HUB_TOKEN (or run `hf auth login`), {fallback}"
    elif "RepositoryNotFoundError" in hub and isinstance(error, hub["RepositoryNotFoundError"]):
        what = f"the Hub dataset {repo_id!r} was not found at {where} (or is private)"
        todo = f"check TAAC_HUB_REPO_ID and TAAC_HUB_TOKEN, {fallback}"
    elif offline_cls is not None and (
        isinstance(error, offline_cls) or isinstance(cause, offline_cls) or constants.HF_HUB_OFFLINE
    ):
        what = "huggingface_hub offline mode is on (HF_HUB_OFFLINE=1) and local_dir holds no complete copy"
        todo = f"unset HF_HUB_OFFLINE to download, {fallback}"
    elif isinstance(error, HubDeadlineExceeded) or isinstance(cause, HubDeadlineExceeded):
        what = f"the fetch from {where} ran past its deadline (TAAC_HUB_DEADLINE_SECONDS)"
        todo = f"re-run to fetch the rest (finished files are kept), raise TAAC_HUB_DEADLINE_SECONDS on a slow link, {fallback}"
        transient = True
    elif isinstance(error, _timeout_errors()) or isinstance(cause, _timeout_errors()):
        what = f"the Hub at {where} did not answer" + (f" within {timeout:g} s (TAAC_HUB_TIMEOUT_SECONDS)" if timeout else "")
        todo = f"check the network, HF_ENDPOINT and any proxy, then re-run (finished files are kept), {fallback}"
        transient = True
    elif isinstance(error, OSError) and error.errno == errno.ENOSPC:
        what = "the disk filled up during the download"
        todo = "free space (finished files are kept), or choose another TAAC_DATA_ROOT"
    elif _is_local_os_error(error):
        what = f"a local file operation failed ({getattr(error, 'strerror', None) or error})"
        todo = "check that the data folder is writable (TAAC_DATA_ROOT) and re-run"
    elif (code := _status_code(error)) is not None and code < 500 and code != 429:
        what = f"the Hub at {where} refused the request (HTTP {code})"
        todo = f"check TAAC_HUB_TOKEN (or HF_TOKEN) and TAAC_HUB_REPO_ID, {fallback}"
    else:  # the network or the Hub itself: worth a retry
        what = f"the Hub at {where} could not be reached" + (f" (HTTP {code})" if code else "")
        todo = f"check the network, HF_ENDPOINT and any proxy, then re-run (finished files are kept), {fallback}"
        transient = True
    underlying = " ".join(str(error).split())  # huggingface_hub messages span lines
    message = (
        f"cannot {stage} Hub dataset {repo_id!r} at revision {revision!r}: {what}. "
        f"Underlying error: {type(error).__name__}: {underlying}. To fix: {todo}."
    )
    return message, transient


# --- time limits ---------------------------------------------------------------------------


class HubDeadlineExceeded(TimeoutError):
    """The whole Hub fetch ran past ``hub_deadline_seconds``."""


@dataclass(frozen=True)
class _TimeLimits:
    """``timeout``: seconds any request may wait to connect or for the next bytes of its answer;
    ``deadline``: the time.monotonic() past which no request starts and no answer is read."""

    timeout: float
    deadline_seconds: float
    deadline: float

    @classmethod
    def starting_now(cls, timeout: float, deadline_seconds: float) -> _TimeLimits:
        return cls(timeout, deadline_seconds, time.monotonic() + deadline_seconds)

    def seconds_left(self, url: object) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise HubDeadlineExceeded(f"{self.deadline_seconds:g} s were over at {url}")
        return left

    def on_request(self, request: Any) -> None:
        """Bound the request's waits: huggingface_hub passes ``timeout=None`` (none) on some calls."""
        wait = min(self.timeout, self.seconds_left(request.url))
        asked = request.extensions.get("timeout") or {}
        bounded = {key: wait if asked.get(key) is None else min(asked[key], wait) for key in ("connect", "read", "write", "pool")}
        request.extensions = {**request.extensions, "timeout": bounded}

    def on_response(self, response: Any) -> None:
        """Stop reading an answer at the deadline, however steadily its bytes trickle in."""
        http = sys.modules[type(response).__module__.partition(".")[0]]  # httpx (huggingface_hub 1.x) or httpx2
        inner, url, limits = response.stream, response.request.url, self

        class DeadlineStream(http.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                for chunk in inner:
                    limits.seconds_left(url)
                    yield chunk

            def close(self) -> None:
                inner.close()

        response.stream = DeadlineStream()


@contextlib.contextmanager
def _time_limits(limits: _TimeLimits) -> Iterator[None]:
    """Every HTTP client huggingface_hub makes in the block keeps ``limits``. It shares one client
    per process, so they bind every Hub request of the process meanwhile."""
    try:
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils import _http
    except ImportError:  # huggingface_hub < 1.0 (requests): only the timeouts passed to each call apply
        yield
        return
    previous = _http._GLOBAL_CLIENT_FACTORY  # no public getter; kept so a factory set by others still applies

    def limited_client() -> Any:
        client = previous()
        hooks = client.event_hooks
        client.event_hooks = {
            "request": [*hooks["request"], limits.on_request], "response": [*hooks["response"], limits.on_response]
        }
        return client

    set_client_factory(limited_client)
    try:
        yield
    finally:
        set_client_factory(previous)


# --- download ------------------------------------------------------------------------------


def _remote_listing(
    api: Any, repo_id: str, commit_sha: str, patterns: Sequence[str]
) -> tuple[dict[str, int], dict[str, str]]:
    """(path -> size, path -> sha256) of the commit's files the patterns select; the sha256 is
    known for files stored in Git LFS (the data files), from the Hub's tree listing."""
    from huggingface_hub.hf_api import RepoFile

    entries = api.list_repo_tree(repo_id, recursive=True, revision=commit_sha, repo_type=REPO_TYPE)
    files = [e for e in entries if isinstance(e, RepoFile) and _matches(e.path, patterns)]
    sizes = dict(sorted((entry.path, entry.size) for entry in files))
    digests = {entry.path: entry.lfs.sha256 for entry in files if getattr(entry, "lfs", None) and entry.lfs.sha256}
    return sizes, dict(sorted(digests.items()))


def _use_local_copy(
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
    if not _is_unreachable(error):
        return None, None  # the Hub answered (no such repo/revision): a local copy can't stand in
    if not local_dir.is_dir() or not any(local_dir.iterdir()):
        return None, f"{local_dir} holds no earlier download"
    manifest = _read_manifest(local_dir)
    expected = None
    digests = None
    commit = None
    if manifest is not None:
        if manifest.get("repo_id") != repo_id:
            return None, f"{local_dir} holds a copy of {manifest.get('repo_id')!r}, not {repo_id!r}"
        if manifest.get("complete") is not True:
            return None, (
                f"the download of commit {manifest.get('commit_sha')} into {local_dir} did not finish; "
                "reconnect to finish it"
            )
        never = sorted(set(families) - set(manifest.get("families") or []))
        if never:
            return None, f"embedding families {never} were never completely downloaded into {local_dir}"
        if include_candidates and not manifest.get("include_candidates", True):
            return None, f"candidate/ was never downloaded into {local_dir}"
        commit = manifest.get("commit_sha")
        if isinstance(manifest.get("files"), dict):
            expected = manifest["files"]
        if isinstance(manifest.get("sha256"), dict):
            digests = manifest["sha256"]
    commit = commit or _commit_from_hf_metadata(local_dir)
    pinned = bool(_COMMIT_SHA.match(revision))
    if pinned and commit is not None and commit != revision:
        return None, f"{local_dir} holds commit {commit}, not the pinned {revision}"
    problems = verify_download(
        local_dir, families, expected=expected, digests=digests, include_candidates=include_candidates
    )
    if problems:
        return None, f"the copy in {local_dir} is incomplete: {'; '.join(problems[:10])}"
    files = _local_files(local_dir, hub_allow_patterns(families, include_candidates=include_candidates))
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
    limits: _TimeLimits

    @property
    def patterns(self) -> list[str]:
        return hub_allow_patterns(self.families, include_candidates=self.include_candidates)

    def fail_or_local(self, error: BaseException, stage: str) -> HubDownload:
        """A verified local copy when the Hub fails, else ``SourceUnavailableError`` saying why
        and how to fix it (``transient`` when a retry may succeed: the network, HTTP 5xx / 429)."""
        local, why_not = _use_local_copy(
            error, repo_id=self.repo_id, revision=self.revision, local_dir=self.local_dir, families=self.families,
            include_candidates=self.include_candidates, log=self.log,
        )
        if local is not None:
            return local
        message, transient = _explain(error, self.repo_id, self.revision, self.endpoint, stage, self.limits.timeout)
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
        repo_id=repo_id, revision=revision, local_dir=Path(local_dir), families=_check_families(families),
        include_candidates=include_candidates, token=token, endpoint=endpoint, max_workers=max_workers,
        log=log or logger, limits=_TimeLimits.starting_now(timeout, deadline),
    )
    with _time_limits(request.limits):
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
    _write_manifest(download, request.families, request.include_candidates, expected, complete=True, digests=digests)
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
    except _catchable() as error:
        return request.fail_or_local(error, "resolve")
    return commit_sha, expected, digests


def _check_release_layout(request: _HubRequest, commit_sha: str, expected: Mapping[str, int]) -> None:
    """A wrong repo or revision shows in the listing: say so before a single byte moves."""
    remote_problems = _listing_problems(expected, request.families)
    if remote_problems:
        raise SourceUnavailableError(
            f"Hub dataset {request.repo_id!r} at revision {request.revision!r} (commit {commit_sha}) does not have the "
            f"expected release layout (format A of docs/domain.md): {'; '.join(remote_problems)}. "
            "Check TAAC_HUB_REPO_ID / TAAC_HUB_REVISION and TAAC_EMBEDDING_FAMILIES."
        )


def _check_free_space(request: _HubRequest, commit_sha: str, expected: Mapping[str, int]) -> int:
    """Bytes still to fetch (files already complete are not fetched again); they must fit on the disk."""
    request.local_dir.mkdir(parents=True, exist_ok=True)
    present = _local_files(request.local_dir, request.patterns)
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
    manifest = _read_manifest(request.local_dir)
    unchanged = (
        complete_on_disk
        and manifest is not None
        and manifest.get("complete") is True
        and manifest.get("commit_sha") == download.commit_sha
        and manifest.get("files") == expected
        and manifest.get("sha256", {}) == digests
    )
    if not unchanged:
        _write_manifest(download, request.families, request.include_candidates, expected, complete=False, digests=digests)


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
        except _catchable() as error:
            # A connection lost mid-way: finished files stay, the next run fetches the rest.
            return request.fail_or_local(error, "download")

        orphans = _remove_orphan_partials(request.local_dir, request.patterns)
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


def _listing_problems(listing: Mapping[str, int], families: Sequence[int]) -> list[str]:
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
