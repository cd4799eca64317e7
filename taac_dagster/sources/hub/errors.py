"""What a failed Hub request means: which errors huggingface_hub and its HTTP client raise,
whether the Hub was unreachable or refused, and the message that says how to fix it."""

from __future__ import annotations

import errno
import sys

from taac_dagster.sources.hub.limits import HubDeadlineExceeded


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
        timeout_class = getattr(sys.modules.get(module_name), "TimeoutException", None)
        if isinstance(timeout_class, type) and issubclass(timeout_class, BaseException):
            found.append(timeout_class)
    return tuple(found)


def catchable() -> tuple[type[BaseException], ...]:
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


def is_unreachable(error: BaseException) -> bool:
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
    return isinstance(error, catchable())


def explain(
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
