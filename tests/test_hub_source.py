"""Hub source: pattern selection, verification, offline behaviour, and fingerprints.

No huggingface_hub function is mocked. The offline tests run the real client against
HF_HUB_OFFLINE or a closed local port; the download tests run the real snapshot_download
against a small in-process HTTP server that answers the four Hub routes it calls (repo info,
tree listing, HEAD/GET resolve). That server follows the public Hub protocol as
huggingface_hub reads it, but it is not huggingface.co: nothing here proves the real repo's
file names, only that our code does the right thing with a Hub that has the release's layout (docs/domain.md, format A).
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import hashlib
import json
import os
import socket
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from taac_dagster.errors import SourceUnavailableError
from taac_dagster.fingerprint import fingerprint_tree
from taac_dagster.sources.hub import (
    MANIFEST_NAME,
    HubDownload,
    download_hub_dataset,
    hub_allow_patterns,
    verify_download,
)

REPO = "TAAC2025/TencentGR-1M"

# A realistic slice of the release's file list (docs/domain.md, format A).
RELEASE_PATHS = [
    "README.md",
    "indexer.pkl",
    "seq/part-0.parquet",
    "seq/part-1.parquet",
    "user_feat/part-0.parquet",
    "item_feat/part-0.parquet",
    "candidate/part-0.parquet",
    "mm_emb/emb_81_32_parquet/part-0.parquet",
    "mm_emb/emb_81_32_parquet/part-1.parquet",
    "mm_emb/emb_82_1024_parquet/part-0.parquet",
    "mm_emb/emb_83_3584_parquet/part-0.parquet",
    "mm_emb/emb_84_4096_parquet/part-0.parquet",
    "mm_emb/emb_85_3584_parquet/part-0.parquet",
    "mm_emb/emb_86_3584_parquet/part-0.parquet",
    ".gitattributes",
]


def release_files(paths: list[str] = RELEASE_PATHS) -> dict[str, bytes]:
    # Distinct, non-empty content per file; verification never parses parquet.
    return {path: (f"PAR1 {path} ".encode() * 50) for path in paths}


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for path, content in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def selected(files: dict[str, bytes], families: list[int]) -> dict[str, bytes]:
    patterns = hub_allow_patterns(families)
    return {p: c for p, c in files.items() if any(fnmatch.fnmatch(p, pat) for pat in patterns)}


class ListLog:
    """Logger-like object (what Dagster's context.log offers) that keeps the messages."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    def info(self, msg: str, *args: object) -> None:
        self.records.append(("info", msg % args if args else msg))

    def warning(self, msg: str, *args: object) -> None:
        self.records.append(("warning", msg % args if args else msg))

    def warnings(self) -> list[str]:
        return [text for level, text in self.records if level == "warning"]


# --- fake Hub ------------------------------------------------------------------------------


class FakeHub:
    """Serves repos {repo_id: {commit_sha: {path: bytes}}} with branch refs, logging requests."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}
        self.refs: dict[str, dict[str, str]] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.api_status: int | None = None  # force an error status on /api routes
        self.cut_once: set[str] = set()  # files whose next GET is cut off half-way
        self.api_headers: dict[str, str] = {}  # sent with a forced api_status
        self.fail_get: set[str] = set()  # files whose GET answers HTTP 500
        # files whose next n GETs send bytes of the right size that do not match their sha256
        self.corrupt_gets: dict[str, int] = {}
        self.hang_api: set[str] = set()  # /api routes ("revision", "tree") that accept and never answer
        self.trickle: set[str] = set()  # files whose GET sends one byte every 0.2 s
        self.closed = threading.Event()  # ends the hung and trickling answers
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

            def do_GET(self) -> None:
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def publish(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        sha = hashlib.sha1(repr(sorted(files.items())).encode() + repo_id.encode()).hexdigest()
        self.commits.setdefault(repo_id, {})[sha] = dict(files)
        self.refs.setdefault(repo_id, {})[branch] = sha
        return sha

    def resolve_requests(self, method: str = "GET") -> list[str]:
        return [path for m, path, _ in self.requests if m == method and "/resolve/" in path]

    def close(self) -> None:
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()

    # -- routing --
    def _send(self, handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers=None, head=False):
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if not head:
            handler.wfile.write(body)

    def _json(self, handler, payload, head=False):
        self._send(handler, 200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, head)

    def _commit(self, repo_id: str, revision: str) -> str | None:
        if repo_id not in self.commits:
            return None
        if revision in self.commits[repo_id]:
            return revision
        return self.refs[repo_id].get(revision)

    def handle(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        parsed = urllib.parse.urlsplit(handler.path)
        path = urllib.parse.unquote(parsed.path)
        self.requests.append(("HEAD" if head else "GET", path, handler.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "datasets"] and len(parts) >= 5:
            if self.api_status is not None:
                return self._send(handler, self.api_status, b"unavailable", self.api_headers, head)
            repo_id, route, revision = "/".join(parts[2:4]), parts[4], "/".join(parts[5:]) or "main"
            if route in self.hang_api:
                self.closed.wait()
                return None
            if repo_id not in self.commits:
                return self._send(handler, 404, b"", {"X-Error-Code": "RepoNotFound"}, head)
            sha = self._commit(repo_id, revision)
            if sha is None:
                return self._send(handler, 404, b"", {"X-Error-Code": "RevisionNotFound"}, head)
            files = self.commits[repo_id][sha]
            if route == "revision":
                siblings = [{"rfilename": p} for p in files]
                return self._json(handler, {"id": repo_id, "sha": sha, "siblings": siblings}, head)
            if route == "tree":
                folders = sorted({"/".join(p.split("/")[: i + 1]) for p in files for i in range(p.count("/"))})
                entries = [{"type": "directory", "oid": "0" * 40, "path": f} for f in folders]
                for p, content in sorted(files.items()):
                    entries.append({
                        "type": "file", "oid": hashlib.sha1(content).hexdigest(), "size": len(content), "path": p,
                        "lfs": {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134},
                    })
                return self._json(handler, entries, head)
        if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
            repo_id, revision, file_path = "/".join(parts[1:3]), parts[4], "/".join(parts[5:])
            sha = self._commit(repo_id, revision)
            content = self.commits.get(repo_id, {}).get(sha or "", {}).get(file_path)
            if content is None:
                return self._send(handler, 404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}
            range_header = handler.headers.get("Range")
            if file_path in self.trickle and not head:
                handler.send_response(200)
                for key, value in {**headers, "Content-Length": str(len(content))}.items():
                    handler.send_header(key, value)
                handler.end_headers()
                with contextlib.suppress(OSError):  # the client gave up
                    for byte in content:
                        if self.closed.wait(0.2):
                            break
                        handler.wfile.write(bytes([byte]))
                        handler.wfile.flush()
                handler.close_connection = True
                return None
            if file_path in self.fail_get and not head:
                return self._send(handler, 500, b"storage error")
            if file_path in self.cut_once and not head and not range_header:
                self.cut_once.discard(file_path)
                handler.send_response(200)
                for key, value in headers.items():
                    handler.send_header(key, value)
                handler.send_header("Content-Length", str(len(content)))
                handler.end_headers()
                handler.wfile.write(content[: len(content) // 2])
                handler.wfile.flush()
                handler.close_connection = True
                return None
            if self.corrupt_gets.get(file_path, 0) > 0 and not head:
                self.corrupt_gets[file_path] -= 1
                flipped = bytearray(content)
                flipped[len(flipped) // 2] ^= 0xFF
                content = bytes(flipped)
            if range_header and not head:
                start = int(range_header.split("=")[1].split("-")[0])
                headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
                return self._send(handler, 206, content[start:], headers)
            return self._send(handler, 200, content, headers, head)
        return self._send(handler, 404, b"", head=head)


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    yield hub
    hub.close()


@pytest.fixture(autouse=True)
def isolated_hf(tmp_path, monkeypatch):
    """Keep huggingface_hub's cache and token away from the user's, online by default.

    huggingface_hub reads its environment once, at import, into huggingface_hub.constants,
    so the constants are patched as well as the environment.
    """
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_ETAG_TIMEOUT", 2)
    monkeypatch.setattr(hf_constants, "HF_HUB_DOWNLOAD_TIMEOUT", 2)


def go_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


class ResettingPort:
    """A port that accepts each connection and resets it at once, counting the attempts: a Hub
    that cannot be reached, where a closed port could not say how often it was tried."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.connections += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            conn.close()

    def __enter__(self) -> ResettingPort:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):  # wakes accept() on Linux; elsewhere close() does
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


class SilentPort:
    """A port that accepts every connection and never answers: a Hub hung mid-request."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:  # closed
                return

    def __enter__(self) -> SilentPort:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
        for conn in self.held:
            conn.close()


def finished_within(seconds: float, call):
    """``call()``'s result or error, failing the test if it still waits after ``seconds`` (a hang)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the test below
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting on the Hub after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def closed_port_endpoint() -> str:
    # A port that was just free: connecting is refused at once instead of timing out.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- allow patterns ------------------------------------------------------------------------


def test_family_81_only_selects_the_core_and_81():
    patterns = hub_allow_patterns([81])
    chosen = [p for p in RELEASE_PATHS if any(fnmatch.fnmatch(p, pat) for pat in patterns)]
    assert chosen == [
        "README.md",
        "indexer.pkl",
        "seq/part-0.parquet",
        "seq/part-1.parquet",
        "user_feat/part-0.parquet",
        "item_feat/part-0.parquet",
        "candidate/part-0.parquet",
        "mm_emb/emb_81_32_parquet/part-0.parquet",
        "mm_emb/emb_81_32_parquet/part-1.parquet",
    ]
    assert not any(f"emb_{family}" in pat for pat in patterns for family in (82, 83, 84, 85, 86))
    # The same rule huggingface_hub applies to allow_patterns selects the same files.
    from huggingface_hub.utils import filter_repo_objects

    assert list(filter_repo_objects(RELEASE_PATHS, allow_patterns=patterns)) == chosen


def test_pattern_cases_named_in_the_brief():
    patterns = hub_allow_patterns([81])

    def included(path: str) -> bool:
        return any(fnmatch.fnmatch(path, pat) for pat in patterns)

    assert included("mm_emb/emb_81_32_parquet/part-0.parquet")
    assert included("seq/part-0.parquet")
    assert not included("mm_emb/emb_83_3584_parquet/part-0.parquet")
    assert not included("mm_emb/emb_811_32_parquet/part-0.parquet")  # no prefix collisions
    assert not included(".gitattributes")


def test_patterns_with_several_families_and_without_candidates():
    patterns = hub_allow_patterns([83, 81, 83], include_candidates=False)
    assert "candidate/*" not in patterns
    assert [p for p in patterns if p.startswith("mm_emb")] == ["mm_emb/emb_83_*/*", "mm_emb/emb_81_*/*"]
    # Family 84 is 32-d in the 10M release: the dim is not part of the pattern.
    assert fnmatch.fnmatch("mm_emb/emb_84_32_parquet/part-0.parquet", hub_allow_patterns([84])[-1])


@pytest.mark.parametrize("family", [80, 87, "81", True])
def test_unknown_family_is_a_clear_error(family):
    with pytest.raises(ValueError, match=r"unknown embedding family .*81, 82, 83, 84, 85, 86"):
        hub_allow_patterns([81, family])


# --- verify_download -----------------------------------------------------------------------


def test_verify_complete_copy(tmp_path):
    write_tree(tmp_path, selected(release_files(), [81, 83]))
    assert verify_download(tmp_path, [81, 83]) == []
    assert verify_download(tmp_path, [81]) == []


def test_verify_reports_missing_pieces(tmp_path):
    files = selected(release_files(), [81])
    del files["indexer.pkl"]
    files = {p: c for p, c in files.items() if not p.startswith("seq/")}
    write_tree(tmp_path, files)
    (tmp_path / "seq").mkdir()  # present but empty
    problems = verify_download(tmp_path, [81, 82])
    assert "seq/ has no parquet files" in problems
    assert "indexer.pkl is missing" in problems
    assert any("embedding family 82" in p and "missing" in p for p in problems)
    assert not any("user_feat" in p or "item_feat" in p for p in problems)
    assert verify_download(tmp_path / "nowhere", [81]) == [f"{tmp_path / 'nowhere'} does not exist"]


def test_verify_reports_empty_files(tmp_path):
    write_tree(tmp_path, selected(release_files(), [81]))
    (tmp_path / "indexer.pkl").write_bytes(b"")
    (tmp_path / "mm_emb/emb_81_32_parquet/part-1.parquet").write_bytes(b"")
    problems = verify_download(tmp_path, [81])
    assert "indexer.pkl is empty" in problems
    assert "mm_emb/emb_81_32_parquet/part-1.parquet is empty (0 bytes)" in problems


def test_verify_reports_leftover_partial_downloads_of_requested_files_only(tmp_path):
    write_tree(tmp_path, selected(release_files(), [81]))
    state = tmp_path / ".cache/huggingface/download"
    (state / "seq").mkdir(parents=True)
    (state / "seq/Zm9v.0123abcd.incomplete").write_bytes(b"half")
    (state / "mm_emb/emb_83_3584_parquet").mkdir(parents=True)
    (state / "mm_emb/emb_83_3584_parquet/YmFy.4567.incomplete").write_bytes(b"half")
    problems = verify_download(tmp_path, [81])
    assert problems == [
        ".cache/huggingface/download/seq/Zm9v.0123abcd.incomplete is a partial download left by an "
        "interrupted run; re-run the download to finish it"
    ]
    # Asking for family 83 now makes its partial file relevant.
    assert len(verify_download(tmp_path, [81, 83])) == 3  # 83's folder missing + two partials


def test_verify_against_an_expected_listing(tmp_path):
    files = selected(release_files(), [81])
    write_tree(tmp_path, files)
    expected = {p: len(c) for p, c in files.items()}
    assert verify_download(tmp_path, [81], expected=expected) == []
    (tmp_path / "seq/part-1.parquet").unlink()
    (tmp_path / "seq/part-0.parquet").write_bytes(b"truncated")
    (tmp_path / "seq/part-9.parquet").write_bytes(b"from an older commit")
    problems = verify_download(tmp_path, [81], expected=expected)
    assert "seq/part-1.parquet is missing" in problems
    assert any(p.startswith("seq/part-0.parquet has 9 bytes") for p in problems)
    assert any(p.startswith("seq/part-9.parquet is not part of the release") for p in problems)


# --- offline and unreachable, no server ----------------------------------------------------


def test_offline_mode_raises_source_unavailable_without_a_request(tmp_path, monkeypatch, fake_hub):
    fake_hub.publish(REPO, release_files())
    go_offline(monkeypatch)
    with pytest.raises(SourceUnavailableError) as caught:
        download_hub_dataset(REPO, "main", tmp_path / "raw", [81], endpoint=fake_hub.url)
    assert fake_hub.requests == []  # offline: the Hub is never asked, so nothing waits on it
    message = str(caught.value)
    assert REPO in message and "'main'" in message
    assert "HF_HUB_OFFLINE" in message
    assert "TAAC_SOURCE=local" in message and "TAAC_LOCAL_PATH" in message
    assert type(caught.value.__cause__).__name__ == "OfflineModeIsEnabled"
    assert not (tmp_path / "raw").exists()  # nothing created when nothing can be fetched


def test_unreachable_endpoint_raises_source_unavailable_after_one_attempt(tmp_path):
    with ResettingPort() as port:
        endpoint = port.url
        with pytest.raises(SourceUnavailableError) as caught:
            download_hub_dataset(REPO, "v1.0", tmp_path / "raw", [81], endpoint=endpoint)
    assert port.connections == 1  # one attempt, refused, reported: no retry loop
    assert caught.value.transient  # a retry later may succeed
    message = str(caught.value)
    assert REPO in message and "'v1.0'" in message
    assert endpoint in message and "could not be reached" in message
    assert "HF_ENDPOINT" in message and "TAAC_SOURCE=local" in message


def test_a_hub_that_never_answers_fails_within_the_timeout_naming_the_endpoint(tmp_path):
    with SilentPort() as port:
        started = time.monotonic()
        with pytest.raises(SourceUnavailableError) as caught:
            finished_within(20, lambda: download_hub_dataset(REPO, "main", tmp_path / "raw", [81], endpoint=port.url, timeout=1))
        assert time.monotonic() - started < 5
    message = str(caught.value)
    assert port.url in message and "did not answer within 1 s" in message and "TAAC_HUB_TIMEOUT_SECONDS" in message
    assert caught.value.transient


@pytest.mark.parametrize(
    ("stall", "timeout", "within", "said"),
    # A hung listing is retried on timeouts (huggingface_hub's backoff): the deadline ends the
    # retries. A trickling download sends each byte well within the timeout: only the deadline stops it.
    [("tree", 1, 12, "deadline"), ("download", 5, 15, "cannot download")],
)
def test_a_stalled_hub_stops_at_the_deadline(tmp_path, fake_hub, stall, timeout, within, said):
    fake_hub.publish(REPO, release_files())
    (fake_hub.hang_api if stall == "tree" else fake_hub.trickle).add("tree" if stall == "tree" else "seq/part-0.parquet")
    started = time.monotonic()
    with pytest.raises(SourceUnavailableError) as caught:
        finished_within(60, lambda: download_hub_dataset(
            REPO, "main", tmp_path / "raw", [81], endpoint=fake_hub.url, timeout=timeout, deadline=3
        ))
    assert time.monotonic() - started < within
    message = str(caught.value)
    assert said in message and "deadline" in message and "TAAC_HUB_DEADLINE_SECONDS" in message
    if stall == "tree":
        assert fake_hub.url in message


def test_complete_local_copy_is_used_offline(tmp_path, monkeypatch):
    local = tmp_path / "raw"
    write_tree(local, selected(release_files(), [81]))
    go_offline(monkeypatch)
    log = ListLog()
    result = download_hub_dataset(REPO, "main", local, [81], log=log)
    assert result.used_local_copy
    assert result.repo_id == REPO and result.revision == "main"
    assert result.commit_sha is None  # no manifest, no huggingface_hub metadata: unknown
    assert "seq/part-0.parquet" in result.files and "indexer.pkl" in result.files
    assert result.total_bytes == sum((local / f).stat().st_size for f in result.files)
    assert any("using the verified local copy" in w for w in log.warnings())


def test_local_copy_commit_comes_from_huggingface_hub_metadata(tmp_path):
    local = tmp_path / "raw"
    write_tree(local, selected(release_files(), [81]))
    sha = "a" * 40
    metadata = local / ".cache/huggingface/download/seq/part-0.parquet.metadata"
    metadata.parent.mkdir(parents=True)
    metadata.write_text(f"{sha}\n{'b' * 64}\n1712656091.123\n")
    result = download_hub_dataset(REPO, "main", local, [81], endpoint=closed_port_endpoint(), log=ListLog())
    assert result.used_local_copy and result.commit_sha == sha


def test_incomplete_local_copy_offline_says_what_is_missing(tmp_path, monkeypatch):
    local = tmp_path / "raw"
    write_tree(local, selected(release_files(), [81]))
    go_offline(monkeypatch)
    with pytest.raises(SourceUnavailableError, match=r"No local fallback: .*embedding family 83"):
        download_hub_dataset(REPO, "main", local, [81, 83])


# --- real snapshot_download against the in-process Hub --------------------------------------


def test_download_fetches_only_the_selected_files(tmp_path, fake_hub):
    files = release_files()
    sha = fake_hub.publish(REPO, files)
    local = tmp_path / "raw"
    log = ListLog()
    result = download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url, log=log, max_workers=2)

    wanted = selected(files, [81])
    assert isinstance(result, HubDownload)
    assert result.commit_sha == sha and result.revision == "main" and not result.used_local_copy
    assert result.files == sorted(wanted)
    assert result.total_bytes == sum(len(c) for c in wanted.values())
    for path, content in wanted.items():
        assert (local / path).read_bytes() == content
    assert not (local / "mm_emb/emb_83_3584_parquet").exists()
    fetched = fake_hub.resolve_requests("GET")
    assert not any("emb_8" in p and "emb_81" not in p for p in fetched)
    assert all(f"/resolve/{sha}/" in p for p in fetched)  # the resolved commit, never the branch
    manifest = json.loads((local / MANIFEST_NAME).read_text())
    assert manifest["commit_sha"] == sha and manifest["repo_id"] == REPO and manifest["families"] == [81]
    assert verify_download(local, [81], expected=manifest["files"]) == []
    assert any("still to fetch" in text for _, text in log.records)


def test_rerun_online_fetches_nothing_and_offline_uses_the_copy(tmp_path, fake_hub, monkeypatch):
    sha = fake_hub.publish(REPO, release_files())
    local = tmp_path / "raw"
    first = download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    fingerprint = fingerprint_tree(local)
    fake_hub.requests.clear()

    again = download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    assert again.files == first.files and again.commit_sha == sha
    assert fake_hub.resolve_requests("GET") == []  # all files already there at this commit

    go_offline(monkeypatch)
    log = ListLog()
    offline = download_hub_dataset(REPO, "main", local, [81], log=log)
    assert offline.used_local_copy and offline.commit_sha == sha and offline.files == first.files
    assert any("branch 'main' may have moved" in w for w in log.warnings())
    # The manifest and huggingface_hub's .cache are hidden: the data version is unchanged.
    assert fingerprint_tree(local).digest == fingerprint.digest
    assert MANIFEST_NAME not in {f["path"] for f in fingerprint.files}


def test_offline_copy_with_a_deleted_file_is_refused(tmp_path, fake_hub, monkeypatch):
    fake_hub.publish(REPO, release_files())
    local = tmp_path / "raw"
    download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    (local / "seq/part-1.parquet").unlink()  # folder still non-empty: only the manifest knows
    go_offline(monkeypatch)
    with pytest.raises(SourceUnavailableError, match=r"seq/part-1.parquet is missing"):
        download_hub_dataset(REPO, "main", local, [81])


def _same_size_corruption(path: Path) -> None:
    """Flip a byte, keeping size and mtime: what neither sizes nor huggingface_hub's own
    metadata (which compares timestamps) can see."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_same_size_corrupt_file_is_caught_by_its_sha256_and_fetched_again(tmp_path, fake_hub):
    """Sizes alone would pass a file whose bytes changed: the sha256 of the Hub's LFS metadata
    does not, and the next download replaces it."""
    files = release_files()
    fake_hub.publish(REPO, files)
    local = tmp_path / "raw"
    download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    manifest = json.loads((local / MANIFEST_NAME).read_text())
    assert manifest["sha256"]["seq/part-0.parquet"] == hashlib.sha256(files["seq/part-0.parquet"]).hexdigest()
    _same_size_corruption(local / "seq/part-0.parquet")
    problems = verify_download(local, [81], expected=manifest["files"], digests=manifest["sha256"])
    assert len(problems) == 1 and problems[0].startswith("seq/part-0.parquet does not match the release (sha256")
    assert not (local / "seq/part-0.parquet").exists()  # removed, so a download fetches it again

    _same_size_corruption(local / "seq/part-1.parquet")
    fake_hub.requests.clear()
    log = ListLog()
    download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url, log=log)
    for name in ("seq/part-0.parquet", "seq/part-1.parquet"):
        assert (local / name).read_bytes() == files[name]
    assert any("did not match their sha256" in w for w in log.warnings())


def test_offline_copy_with_a_corrupt_file_is_refused(tmp_path, fake_hub, monkeypatch):
    fake_hub.publish(REPO, release_files())
    local = tmp_path / "raw"
    download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    _same_size_corruption(local / "indexer.pkl")
    go_offline(monkeypatch)
    with pytest.raises(SourceUnavailableError, match=r"indexer.pkl does not match the release \(sha256"):
        download_hub_dataset(REPO, "main", local, [81])


def test_bytes_that_fail_their_sha256_once_are_fetched_again_once(tmp_path, fake_hub):
    """The Hub sends a file whose bytes (right size) do not match its LFS sha256: the check
    removes it and one more download fetches it; every other file is fetched once."""
    files = release_files()
    sha = fake_hub.publish(REPO, files)
    fake_hub.corrupt_gets["seq/part-0.parquet"] = 1
    local = tmp_path / "raw"
    log = ListLog()
    result = download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url, log=log)
    fetched = collections.Counter(p.split(f"/resolve/{sha}/", 1)[1] for p in fake_hub.resolve_requests("GET"))
    assert fetched == {path: 2 if path == "seq/part-0.parquet" else 1 for path in result.files}
    assert (local / "seq/part-0.parquet").read_bytes() == files["seq/part-0.parquet"]
    assert [w for w in log.warnings() if "did not match their sha256" in w] != []
    assert json.loads((local / MANIFEST_NAME).read_text())["complete"] is True


def test_bytes_that_always_fail_their_sha256_are_refused_after_one_more_fetch(tmp_path, fake_hub):
    files = release_files()
    sha = fake_hub.publish(REPO, files)
    fake_hub.corrupt_gets["seq/part-0.parquet"] = 1_000
    local = tmp_path / "raw"
    with pytest.raises(SourceUnavailableError) as refused:
        download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url, log=ListLog())
    message = str(refused.value)
    assert f"commit {sha}" in message and "seq/part-0.parquet does not match the release (sha256" in message
    assert "seq/part-1.parquet" not in message  # only the bad file is named
    # Fetched, checked, fetched again once, refused: exactly two GETs, no loop.
    assert fake_hub.resolve_requests("GET").count(f"/datasets/{REPO}/resolve/{sha}/seq/part-0.parquet") == 2
    assert fake_hub.corrupt_gets["seq/part-0.parquet"] == 1_000 - 2
    assert not (local / "seq/part-0.parquet").exists()  # the bad bytes are not left to be read
    assert json.loads((local / MANIFEST_NAME).read_text())["complete"] is False


def test_offline_copy_of_another_repo_or_commit_is_refused(tmp_path, fake_hub):
    sha = fake_hub.publish(REPO, release_files())
    local = tmp_path / "raw"
    download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    dead = closed_port_endpoint()
    with pytest.raises(SourceUnavailableError, match=r"holds a copy of 'TAAC2025/TencentGR-1M'"):
        download_hub_dataset("TAAC2025/TencentGR-10M", "main", local, [81], endpoint=dead)
    with pytest.raises(SourceUnavailableError, match=rf"holds commit {sha}, not the pinned"):
        download_hub_dataset(REPO, "f" * 40, local, [81], endpoint=dead)
    pinned = download_hub_dataset(REPO, sha, local, [81], endpoint=dead, log=ListLog())
    assert pinned.used_local_copy and pinned.commit_sha == sha


def test_connection_cut_mid_file_resumes_with_a_range_request(tmp_path, fake_hub):
    # huggingface_hub writes in DOWNLOAD_CHUNK_SIZE pieces; bytes of an unfinished piece are
    # lost with the connection, so the file must span a few pieces for the Range to show.
    chunk = hf_constants.DOWNLOAD_CHUNK_SIZE
    files = release_files()
    target = "seq/part-1.parquet"
    files[target] = hashlib.sha256(b"seed").digest() * (3 * chunk // 32 + 7)
    fake_hub.publish(REPO, files)
    fake_hub.cut_once.add(target)  # first GET sends half the body, then drops the connection
    local = tmp_path / "raw"
    download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    assert (local / target).read_bytes() == files[target]
    gets = [r for m, p, r in fake_hub.requests if m == "GET" and p.endswith(target)]
    kept = (len(files[target]) // 2) // chunk * chunk
    assert gets == [None, f"bytes={kept}-"] and kept > 0


def test_rerun_after_a_killed_run_fetches_only_what_is_missing(tmp_path, fake_hub):
    files = release_files()
    fake_hub.publish(REPO, files)
    local = tmp_path / "raw"
    download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    # What a SIGKILL half-way through seq/part-1.parquet leaves: no file, no metadata, and
    # a partial under huggingface_hub's download state.
    (local / "seq/part-1.parquet").unlink()
    (local / ".cache/huggingface/download/seq/part-1.parquet.metadata").unlink()
    orphan = local / ".cache/huggingface/download/seq/TACi0Bs29TNFPOA4DVD6oNoamBw=.abc.1234abcd.incomplete"
    orphan.write_bytes(files["seq/part-1.parquet"][:100])
    assert any("interrupted run" in p for p in verify_download(local, [81]))

    fake_hub.requests.clear()
    log = ListLog()
    result = download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url, log=log)
    assert fake_hub.resolve_requests("GET") == [f"/datasets/{REPO}/resolve/{result.commit_sha}/seq/part-1.parquet"]
    assert (local / "seq/part-1.parquet").read_bytes() == files["seq/part-1.parquet"]
    assert not orphan.exists()
    assert any("Removed 1 partial download" in text for _, text in log.records)
    assert verify_download(local, [81]) == []


def test_unknown_repo_and_bad_revision_name_the_fix(tmp_path, fake_hub):
    fake_hub.publish(REPO, release_files())
    with pytest.raises(SourceUnavailableError) as caught:
        download_hub_dataset("TAAC2025/NoSuchRelease", "main", tmp_path / "a", [81], endpoint=fake_hub.url)
    assert "TAAC2025/NoSuchRelease" in str(caught.value) and "TAAC_HUB_REPO_ID" in str(caught.value)
    with pytest.raises(SourceUnavailableError) as caught:
        download_hub_dataset(REPO, "v9", tmp_path / "b", [81], endpoint=fake_hub.url)
    assert "revision 'v9' does not exist" in str(caught.value) and "TAAC_HUB_REVISION" in str(caught.value)


def test_not_found_is_not_papered_over_by_a_local_copy(tmp_path, fake_hub):
    # The Hub answered "no such revision": a local copy can't stand in for it.
    fake_hub.publish(REPO, release_files())
    local = tmp_path / "raw"
    download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        download_hub_dataset(REPO, "v9", local, [81], endpoint=fake_hub.url)


def test_hub_outage_falls_back_to_a_complete_copy(tmp_path, fake_hub):
    sha = fake_hub.publish(REPO, release_files())
    local = tmp_path / "raw"
    download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    fake_hub.api_status = 503
    fake_hub.requests.clear()
    result = download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url, log=ListLog())
    assert result.used_local_copy and result.commit_sha == sha
    # One question to the Hub per call, answered 503, and no retry loop in front of the fallback.
    info = ("GET", f"/api/datasets/{REPO}/revision/main", None)
    assert fake_hub.requests == [info]
    fake_hub.requests.clear()
    with pytest.raises(SourceUnavailableError, match=r"HTTP 503") as refused:
        download_hub_dataset(REPO, "main", tmp_path / "empty", [81], endpoint=fake_hub.url)
    assert fake_hub.requests == [info] and refused.value.transient


def test_download_without_candidates(tmp_path, fake_hub):
    fake_hub.publish(REPO, release_files())
    local = tmp_path / "raw"
    result = download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url, include_candidates=False)
    assert not any(f.startswith("candidate/") for f in result.files)
    assert not (local / "candidate").exists()
    # A candidate/ folder from elsewhere is neither required nor taken for a stray file.
    write_tree(local, {"candidate/part-0.parquet": b"PAR1"})
    fake_hub.requests.clear()
    again = download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url, include_candidates=False)
    assert again.files == result.files and not again.used_local_copy
    assert fake_hub.resolve_requests("GET") == [] and (local / "candidate/part-0.parquet").read_bytes() == b"PAR1"


def test_interrupted_update_is_not_used_offline(tmp_path, fake_hub, monkeypatch):
    files = release_files()
    fake_hub.publish(REPO, files)
    local = tmp_path / "raw"
    download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    newer = dict(files, **{"seq/part-1.parquet": b"PAR1 new " * 10})
    new_sha = fake_hub.publish(REPO, newer)
    fake_hub.fail_get.add("seq/part-1.parquet")
    with pytest.raises(SourceUnavailableError, match=r"HTTP 500.*did not finish"):
        download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    assert json.loads((local / MANIFEST_NAME).read_text())["complete"] is False

    go_offline(monkeypatch)
    with pytest.raises(SourceUnavailableError, match=rf"download of commit {new_sha} .* did not finish"):
        download_hub_dataset(REPO, "main", local, [81])
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    fake_hub.fail_get.clear()
    done = download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    assert done.commit_sha == new_sha
    assert json.loads((local / MANIFEST_NAME).read_text())["complete"] is True


def test_offline_copy_without_a_requested_family_is_refused(tmp_path, fake_hub, monkeypatch):
    files = release_files()
    fake_hub.publish(REPO, files)
    local = tmp_path / "raw"
    download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    write_tree(local, {p: c for p, c in files.items() if "emb_83" in p})  # copied in by hand
    go_offline(monkeypatch)
    with pytest.raises(SourceUnavailableError, match=r"families \[83\] were never completely downloaded"):
        download_hub_dataset(REPO, "main", local, [81, 83])


def test_rejected_credentials_point_at_the_token(tmp_path, fake_hub):
    fake_hub.publish(REPO, release_files())
    fake_hub.api_status = 401
    fake_hub.api_headers = {"X-Error-Message": "Invalid credentials in Authorization header"}
    with pytest.raises(SourceUnavailableError, match=r"refused the request \(HTTP 401\).*TAAC_HUB_TOKEN"):
        download_hub_dataset(REPO, "main", tmp_path / "raw", [81], endpoint=fake_hub.url, token="hf_wrong")


def test_wrong_layout_is_refused_before_downloading(tmp_path, fake_hub):
    fake_hub.publish("someone/other-dataset", {"data/train.parquet": b"x" * 10, "README.md": b"hi"})
    with pytest.raises(SourceUnavailableError, match=r"expected release layout.*no seq/\*\.parquet"):
        download_hub_dataset("someone/other-dataset", "main", tmp_path / "raw", [81], endpoint=fake_hub.url)
    assert fake_hub.resolve_requests("GET") == []


def test_files_dropped_by_a_new_commit_are_reported(tmp_path, fake_hub):
    files = release_files()
    fake_hub.publish(REPO, files)
    local = tmp_path / "raw"
    download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    newer = {p: c for p, c in files.items() if p != "seq/part-1.parquet"}
    newer["seq/part-0.parquet"] = b"PAR1 merged " * 99
    new_sha = fake_hub.publish(REPO, newer)
    with pytest.raises(SourceUnavailableError, match=r"seq/part-1.parquet is not part of the release"):
        download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    (local / "seq/part-1.parquet").unlink()
    result = download_hub_dataset(REPO, "main", local, [81], endpoint=fake_hub.url)
    assert result.commit_sha == new_sha
    assert (local / "seq/part-0.parquet").read_bytes() == newer["seq/part-0.parquet"]


# --- fingerprint ---------------------------------------------------------------------------


def test_fingerprint_is_deterministic_and_location_independent(tmp_path):
    files = selected(release_files(), [81])
    write_tree(tmp_path / "a", files)
    write_tree(tmp_path / "b", dict(reversed(list(files.items()))))
    first = fingerprint_tree(tmp_path / "a")
    assert fingerprint_tree(tmp_path / "a") == first
    assert fingerprint_tree(tmp_path / "b").digest == first.digest
    assert [f["path"] for f in first.files] == sorted(files)
    assert first.total_bytes == sum(len(c) for c in files.values())
    assert {f["mode"] for f in first.files} == {"full"}


def test_fingerprint_changes_with_one_byte_and_with_a_rename(tmp_path):
    write_tree(tmp_path, {"seq/part-0.parquet": b"0123456789" * 100, "indexer.pkl": b"idx"})
    before = fingerprint_tree(tmp_path).digest
    target = tmp_path / "seq/part-0.parquet"
    data = bytearray(target.read_bytes())
    data[500] ^= 1
    target.write_bytes(bytes(data))
    changed = fingerprint_tree(tmp_path).digest
    assert changed != before
    target.rename(tmp_path / "seq/part-1.parquet")
    assert fingerprint_tree(tmp_path).digest not in (before, changed)


def test_fingerprint_skips_hidden_files_and_folders(tmp_path):
    write_tree(tmp_path, {"seq/part-0.parquet": b"data"})
    before = fingerprint_tree(tmp_path)
    write_tree(tmp_path, {
        ".cache/huggingface/download/seq/x.incomplete": b"partial",
        "seq/.part-0.parquet.tmp-1234abcd": b"temp",
        MANIFEST_NAME: b"{}",
    })
    after = fingerprint_tree(tmp_path)
    assert after == before
    assert fingerprint_tree(tmp_path, [Path("seq/.part-0.parquet.tmp-1234abcd")]).files == []


def test_fingerprint_samples_files_above_the_limit(tmp_path):
    big = bytes(range(256)) * 64  # 16 KiB
    write_tree(tmp_path, {"mm_emb/emb_81_32_parquet/part-0.parquet": big, "indexer.pkl": b"idx"})
    result = fingerprint_tree(tmp_path, full_hash_limit=1024)
    modes = {f["path"]: f["mode"] for f in result.files}
    assert modes == {"indexer.pkl": "full", "mm_emb/emb_81_32_parquet/part-0.parquet": "sampled"}
    # A changed head byte or a changed size is seen; a full hash gives a different digest.
    target = tmp_path / "mm_emb/emb_81_32_parquet/part-0.parquet"
    target.write_bytes(b"\xff" + big[1:])
    assert fingerprint_tree(tmp_path, full_hash_limit=1024).digest != result.digest
    target.write_bytes(big + b"\x00")
    assert fingerprint_tree(tmp_path, full_hash_limit=1024).digest != result.digest
    target.write_bytes(big)
    assert fingerprint_tree(tmp_path, full_hash_limit=1024).digest == result.digest
    assert fingerprint_tree(tmp_path).digest != result.digest


def test_fingerprint_sampling_windows_on_a_large_file(tmp_path, monkeypatch):
    # Shrink the window so a small file shows the documented blind spot of sampling: a
    # same-size edit outside head, middle and tail is not seen (the commit sha covers it).
    import taac_dagster.fingerprint as fp

    monkeypatch.setattr(fp, "SAMPLE_WINDOW", 16)
    data = bytearray(b"a" * 1000)
    (tmp_path / "big.parquet").write_bytes(bytes(data))
    base = fingerprint_tree(tmp_path, full_hash_limit=100).digest
    for offset, seen in ((0, True), (492, True), (999, True), (200, False)):
        edited = bytearray(data)
        edited[offset] = ord("b")
        (tmp_path / "big.parquet").write_bytes(bytes(edited))
        assert (fingerprint_tree(tmp_path, full_hash_limit=100).digest != base) is seen, offset


def test_fingerprint_of_chosen_files_and_progress(tmp_path, capsys):
    write_tree(tmp_path, {"seq/part-0.parquet": b"s" * 100, "user_feat/part-0.parquet": b"u" * 50})
    only_seq = fingerprint_tree(tmp_path, [tmp_path / "seq/part-0.parquet"], progress=True)
    assert [f["path"] for f in only_seq.files] == ["seq/part-0.parquet"]
    assert only_seq.total_bytes == 100
    assert "Fingerprinting" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not inside"):
        fingerprint_tree(tmp_path / "seq", [tmp_path / "user_feat/part-0.parquet"])
    with pytest.raises(FileNotFoundError):
        fingerprint_tree(tmp_path / "missing")


def test_hub_source_with_families_on_auto_fetches_family_81_alone(tmp_path, fake_hub, monkeypatch):
    """Auto (the default) must not start a 137 GB download: the Hub source fetches family 81
    alone, and the raw manifest records what was selected and that the setting was auto."""
    from taac_dagster.paths import TrackPaths
    from taac_dagster.raw import materialize_raw
    from taac_dagster.settings import load_settings

    fake_hub.publish(REPO, release_files())
    settings = load_settings("1M", {"data_root": str(tmp_path / "data"), "source": "hub", "hub_endpoint": fake_hub.url})
    assert settings.embedding_families is None
    paths = TrackPaths(settings.data_root, "1M")
    manifest = materialize_raw(settings, paths)
    assert manifest.families == [81] and manifest.families_requested is None
    assert [p.name for p in (paths.raw_for("hub") / "mm_emb").iterdir()] == ["emb_81_32_parquet"]
    recorded = json.loads(paths.raw_manifest.read_text())
    assert recorded["families"] == [81] and recorded["families_requested"] is None


def test_switching_source_never_deletes_the_download(tmp_path, fake_hub, monkeypatch):
    """The synthetic and Hub sources keep separate folders (raw/synthetic, raw/hub): generating
    a dataset after a download leaves the download as it was, and back again fetches nothing."""
    from taac_dagster.paths import TrackPaths
    from taac_dagster.raw import materialize_raw
    from taac_dagster.settings import load_settings

    fake_hub.publish(REPO, release_files())
    base = {"data_root": str(tmp_path / "data"), "synthetic": {"num_users": 50, "num_items": 200},
            "hub_endpoint": fake_hub.url}
    paths = TrackPaths(tmp_path / "data", "1M")
    from_hub = materialize_raw(load_settings("1M", {**base, "source": "hub"}), paths)
    assert from_hub.root == str(paths.raw_published("hub"))
    download = fingerprint_tree(paths.raw_for("hub")).digest
    synthetic = materialize_raw(load_settings("1M", base), paths)
    assert synthetic.root == str(paths.raw_for("synthetic"))
    assert fingerprint_tree(paths.raw_for("hub")).digest == download
    fake_hub.requests.clear()
    again = materialize_raw(load_settings("1M", {**base, "source": "hub"}), paths)
    assert again.digest == from_hub.digest and fake_hub.resolve_requests("GET") == []


def test_a_download_in_the_old_raw_folder_is_moved_not_fetched_again(tmp_path, fake_hub, monkeypatch):
    from taac_dagster.paths import TrackPaths
    from taac_dagster.raw import materialize_raw
    from taac_dagster.settings import load_settings

    fake_hub.publish(REPO, release_files())
    paths = TrackPaths(tmp_path / "data", "1M")
    download_hub_dataset(REPO, "main", paths.raw, [81], endpoint=fake_hub.url)  # the layout before raw/hub
    fake_hub.requests.clear()
    settings = load_settings("1M", {"data_root": str(tmp_path / "data"), "source": "hub", "hub_endpoint": fake_hub.url})
    manifest = materialize_raw(settings, paths)
    assert manifest.root == str(paths.raw_published("hub")) and (paths.raw_for("hub") / MANIFEST_NAME).is_file()
    assert fake_hub.resolve_requests("GET") == []
    assert sorted(p.name for p in paths.raw.iterdir()) == ["hub", "hub-published"]


def test_a_failed_update_leaves_the_published_copy_the_manifest_describes(tmp_path, fake_hub, monkeypatch):
    """The warehouse reads the published copy (hard links, one folder switch), not the folder a
    download writes into: an update that replaced some files and then failed leaves the files
    the raw manifest describes, and the next complete download publishes the new release."""
    from taac_dagster.paths import TrackPaths
    from taac_dagster.raw import RawManifest, materialize_raw, verify_raw_files
    from taac_dagster.settings import load_settings

    files = release_files()
    fake_hub.publish(REPO, files)
    settings = load_settings("1M", {"data_root": str(tmp_path / "data"), "source": "hub", "hub_repo_id": REPO,
                                    "hub_endpoint": fake_hub.url})
    paths = TrackPaths(settings.data_root, "1M")
    first = materialize_raw(settings, paths)
    published, download = paths.raw_published("hub"), paths.raw_for("hub")
    assert Path(first.root) == published
    part = "seq/part-1.parquet"
    assert (published / part).stat().st_ino == (download / part).stat().st_ino  # linked, not copied
    assert not any(p.name.startswith(".") for p in published.iterdir())  # no download state published

    update = dict(files)
    update[part] = b"PAR1 updated " * 60
    update["item_feat/part-0.parquet"] = b"PAR1 updated features " * 40
    fake_hub.publish(REPO, update)
    fake_hub.fail_get.add("item_feat/part-0.parquet")
    with pytest.raises(SourceUnavailableError):
        materialize_raw(settings, paths)
    assert (download / part).read_bytes() == update[part]  # the download did replace a file
    manifest = RawManifest.read(paths.raw_manifest)
    assert manifest.digest == first.digest
    verify_raw_files(manifest, paths.raw_manifest)  # ... and the published copy is still the old release
    assert (published / part).read_bytes() == files[part]

    fake_hub.fail_get.clear()
    second = materialize_raw(settings, paths)
    verify_raw_files(RawManifest.read(paths.raw_manifest), paths.raw_manifest)
    assert second.digest != first.digest and Path(second.root) == published
    assert (published / part).read_bytes() == update[part]
    assert (published / "item_feat/part-0.parquet").read_bytes() == update["item_feat/part-0.parquet"]
    again = materialize_raw(settings, paths)  # nothing new: the published folder is kept as is
    assert again.digest == second.digest and (published / part).stat().st_ino == (download / part).stat().st_ino
