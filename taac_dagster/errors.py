"""Errors that point a user at the exact place where their data went wrong."""

from __future__ import annotations

from pathlib import Path

from models.errors import ModelError


class TaacError(Exception):
    """Base class for errors this project raises on purpose."""


# Errors raised on purpose, by the pipeline or by the model code it runs (models/ does not
# import the pipeline, so its errors have their own base).
PROJECT_ERRORS: tuple[type[TaacError], type[ModelError]] = (TaacError, ModelError)


class DataFormatError(TaacError):
    """Input data is not in the expected shape.

    The message always names the file, the line (JSONL, 1-based) or row (parquet, 0-based
    within the file) when known, the record within the line and the field when known, what
    was expected, and what was found.
    """

    def __init__(
        self,
        path: str | Path,
        expected: str,
        found: str | None = None,
        *,
        line: int | None = None,
        row: int | None = None,
        record: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.line = line
        self.row = row
        self.record = record
        self.field = field
        self.expected = expected
        self.found = found
        where = str(self.path)
        if line is not None:
            where += f", line {line}"
        if row is not None:
            where += f", row {row}"
        if record is not None:
            where += f", record {record}"
        if field is not None:
            where += f", field {field}"
        message = f"{where}: expected {expected}"
        if found is not None:
            message += f"; found {found}"
        super().__init__(message)


class UnknownTrackError(TaacError, ValueError):
    def __init__(self, track: str, known: tuple[str, ...]) -> None:
        super().__init__(f"unknown track {track!r}: expected one of {', '.join(known)}")


class SourceUnavailableError(TaacError):
    """A data source cannot be reached (offline Hub, missing local path). ``transient``: a
    retry may succeed (the network, the Hub's own errors), so a retry policy may retry it."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class RawDataChangedError(TaacError):
    """The raw files differ from what ``raw_dataset`` recorded: building from them would
    publish a warehouse that carries a fingerprint it was not built from."""

    def __init__(self, manifest: str | Path, changes: list[str]) -> None:
        self.changes = changes
        shown = "\n".join(f"- {change}" for change in changes[:10])
        more = f"\n- ... and {len(changes) - 10} more" if len(changes) > 10 else ""
        super().__init__(
            f"the raw files changed since {manifest} was written ({len(changes)} difference(s)):\n{shown}{more}\n"
            "materialize raw_dataset again (it records the files as they are now), then this step"
        )
