"""Helpers for the browser test (tests/test_ui.py): a `dagster dev` server in its own process
group on a free loopback port, a GraphQL client for it, and the browser it is driven with.

Nothing here imports Playwright, so the module loads (and the test can skip cleanly) where
Playwright is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DAGSTER = str(VENV_BIN / "dagster")

# Debian's package (apt-get install chromium) first; then whatever is on PATH.
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]


def find_chromium() -> str | None:
    for candidate in CHROMIUM_CANDIDATES:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def isolated_env(home: Path, settings: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment without any TAAC_* setting, plus DAGSTER_HOME and `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAAC_")}
    env.update(settings)
    env["DAGSTER_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("DAGSTER_CLI_API_GRPC_HOST", None)
    return env


def _default_signals() -> None:
    # A process started from a non-interactive shell's background job inherits SIGINT ignored;
    # `dagster dev` maps SIGTERM onto SIGINT's handler, so it would ignore SIGTERM as well.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_cli(args: list[str], *, env: Mapping[str, str], cwd: Path, log: Path, timeout: float) -> None:
    """Run a dagster CLI command to completion; its output goes to `log`. Fails with the tail."""
    started = time.monotonic()
    with open(log, "wb") as out:
        try:
            proc = subprocess.run(
                [DAGSTER, *args], env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                timeout=timeout, start_new_session=True, preexec_fn=_default_signals,
            )
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`dagster {' '.join(args)}` ran over {timeout:.0f}s; log tail:\n{tail(log)}") from None
    if proc.returncode != 0:
        raise AssertionError(
            f"`dagster {' '.join(args)}` exited {proc.returncode} after {time.monotonic() - started:.0f}s;"
            f" log tail ({log}):\n{tail(log)}"
        )


class DagsterDev:
    """`dagster dev -w workspace.yaml` on 127.0.0.1:<free port>, in a session of its own."""

    def __init__(self, *, workspace: Path, env: Mapping[str, str], cwd: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_handle = open(log, "wb")
        self.proc = subprocess.Popen(
            [DAGSTER, "dev", "-w", str(workspace), "-h", "127.0.0.1", "-p", str(self.port)],
            env=dict(env), cwd=cwd, stdout=self._log_handle, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_default_signals,
        )

    # -- talking to it -------------------------------------------------------------------------

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 10) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.load(response)
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def _failed(self, message: str) -> AssertionError:
        return AssertionError(f"{message}; `dagster dev` log tail ({self.log}):\n{tail(self.log)}")

    def wait_ready(self, timeout: float = 180) -> None:
        """Until /server_info answers and the workspace's code location is loaded."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._failed(f"`dagster dev` exited with {self.proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=5) as response:
                    json.load(response)
                data = self.graphql(
                    "{ workspaceOrError { __typename ... on Workspace { locationEntries {"
                    " name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"
                )
                entries = data["workspaceOrError"].get("locationEntries") or []
                for entry in entries:
                    error = entry.get("locationOrLoadError") or {}
                    if error.get("__typename") == "PythonError":
                        raise self._failed(f"code location {entry['name']} failed to load: {error['message']}")
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    return
                last = f"locations {[(e['name'], e['loadStatus']) for e in entries]}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise self._failed(f"`dagster dev` at {self.url} not ready within {timeout:.0f}s (last: {last})")

    def run_status(self, run_id: str) -> dict:
        data = self.graphql(
            "query($id: ID!) { runOrError(runId: $id) { __typename"
            " ... on Run { status jobName tags { key value } } ... on PythonError { message } } }",
            {"id": run_id},
        )
        return data["runOrError"]

    def wait_run(self, run_id: str, timeout: float = 300) -> dict:
        """Poll the run until it ends; returns its last status record."""
        deadline = time.monotonic() + timeout
        record: dict = {}
        while time.monotonic() < deadline:
            record = self.run_status(run_id)
            if record.get("status") in ("SUCCESS", "FAILURE", "CANCELED"):
                return record
            if self.proc.poll() is not None:
                raise self._failed(f"`dagster dev` exited with {self.proc.returncode} while run {run_id} ran")
            time.sleep(1)
        raise self._failed(f"run {run_id} did not finish within {timeout:.0f}s (last: {record})")

    # -- stopping it ---------------------------------------------------------------------------

    def stop(self, grace: float = 30) -> None:
        """SIGTERM to the server's process group, SIGKILL to what is left after `grace` seconds."""
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        # The leader is gone or overdue: nothing it started may outlive the test.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log_handle.close()
