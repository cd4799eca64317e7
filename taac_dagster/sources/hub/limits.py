"""Time limits of the Hub requests: a timeout per wait and a deadline for the whole fetch,
applied to every HTTP client huggingface_hub makes."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


class HubDeadlineExceeded(TimeoutError):
    """The whole Hub fetch ran past ``hub_deadline_seconds``."""


@dataclass(frozen=True)
class TimeLimits:
    """``timeout``: seconds any request may wait to connect or for the next bytes of its answer;
    ``deadline``: the time.monotonic() past which no request starts and no answer is read."""

    timeout: float
    deadline_seconds: float
    deadline: float

    @classmethod
    def starting_now(cls, timeout: float, deadline_seconds: float) -> TimeLimits:
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
        byte_stream: Any = http.SyncByteStream  # the client's own class: httpx reads only its subclasses
        inner, url, limits = response.stream, response.request.url, self

        class DeadlineStream(byte_stream):
            def __iter__(self) -> Iterator[bytes]:
                for chunk in inner:
                    limits.seconds_left(url)
                    yield chunk

            def close(self) -> None:
                inner.close()

        response.stream = DeadlineStream()


@contextlib.contextmanager
def time_limits(limits: TimeLimits) -> Iterator[None]:
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
