"""The project's own errors as ``dagster.Failure``: the message as the description, and the
file, line, what was expected, what was found and how to fix it as metadata, so the UI shows
the cause and the fix instead of a stack trace. The original error stays the failure's cause.

Every writing step runs inside ``explained_failures`` (through ``assets.track_lock.hold_track``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster import Failure, MetadataValue

from models.errors import ModelError
from taac_dagster.errors import PROJECT_ERRORS, DataFormatError, SourceUnavailableError, TaacError
from taac_dagster.locks import TrackBusyError

# How to fix an error of each kind, most specific first (the messages themselves say what
# to change where they know; these add where to go next).
FIXES: tuple[tuple[type[BaseException], str], ...] = (
    (DataFormatError, "Repair or replace the file named above at that line or row (its first value that breaks a rule; "
                      "docs/data.md lists what every record is held to), or point TAAC_LOCAL_PATH at another copy, then "
                      "re-materialize raw_dataset."),
    (SourceUnavailableError, "Change the source settings the message names (TAAC_SOURCE, TAAC_LOCAL_PATH, TAAC_HUB_*; "
                             "docs/settings.md), then re-materialize raw_dataset."),
    (TrackBusyError, "Wait for the run named above to end (or stop it), or raise TAAC_TRACK_LOCK_TIMEOUT."),
    (TaacError, "Do what the message says, then re-materialize this asset."),
    (ModelError, "Do what the message says, then re-materialize this asset."),
)


def fix_for(error: BaseException) -> str:
    return next(fix for kind, fix in FIXES if isinstance(error, kind))


def failure_metadata(error: TaacError | ModelError) -> dict[str, Any]:
    """Where the error points (file, line or row, record, field), what was expected and found, the fix."""
    metadata: dict[str, Any] = {"error": type(error).__name__}
    if isinstance(error, DataFormatError):
        metadata["file"] = MetadataValue.path(str(error.path))
        for key in ("line", "row", "record"):
            if getattr(error, key) is not None:
                metadata[key] = int(getattr(error, key))
        for key in ("field", "expected", "found"):
            if getattr(error, key) is not None:
                metadata[key] = str(getattr(error, key))
    metadata["fix"] = fix_for(error)
    return metadata


def as_failure(error: TaacError | ModelError) -> Failure:
    """A Failure that carries the error's message and metadata; only an error a retry may cure
    (a transient Hub failure) lets a retry policy retry the step."""
    return Failure(
        description=f"{error}\n\nTo fix: {fix_for(error)}",
        metadata=failure_metadata(error),
        allow_retries=bool(getattr(error, "transient", False)),
    )


@contextmanager
def explained_failures() -> Iterator[None]:
    """Re-raise the project's errors raised inside as ``dagster.Failure`` (see ``as_failure``)."""
    try:
        yield
    except PROJECT_ERRORS as error:
        raise as_failure(error) from error
