"""What every JSON-lines input shares: size limits, empty files, and naming the bad line.

DuckDB parses the files (fast path) and numbers the lines it reads (``WITH ORDINALITY``); it
skips blank lines, so its numbers count non-blank lines. When a file breaks the format, the
helpers here turn that number into the line a text editor shows, and find what DuckDB
could not parse (a line too long, bytes that are not UTF-8, invalid JSON), reading the file
in bounded pieces: a file written as one huge line never has to fit in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from taac_dagster.errors import DataFormatError

# The longest line read (DuckDB's maximum_object_size). A user of 100 records with every
# feature is ~25 KB, a 4096-d embedding ~90 KB: anything near this is not one line per record.
MAX_LINE_BYTES = 64 * 2**20

# The JSON text of an integer as DuckDB writes a parsed value back (minified, no exponent,
# no fraction): what TRY_CAST to BIGINT alone would not tell from "12", 1.5 or 1e3.
_JSON_INTEGER_PATTERN = "-?[0-9]+"


def json_integer_sql(text: str, sql_type: str = "BIGINT") -> str:
    """DuckDB expression: the JSON value whose text is ``text`` as ``sql_type``, NULL when it is
    not a JSON integer of that range (a string, a fraction, a float such as 1e3, out of range)."""
    return f"CASE WHEN regexp_full_match({text}, '{_JSON_INTEGER_PATTERN}') THEN TRY_CAST({text} AS {sql_type}) END"


def require_content(path: Path, expected: str) -> None:
    """An input file with no bytes (or only blank lines) is an error naming the file."""
    if not path.is_file():
        raise DataFormatError(path, expected, "no such file")
    if path.stat().st_size == 0:
        raise DataFormatError(path, expected, "an empty file (0 bytes)")


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes, complete) for every line, each read with a bounded buffer; a line
    longer than ``MAX_LINE_BYTES`` comes back cut, with complete = False, and ends the scan."""
    with open(path, "rb") as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                yield number, raw, False
                return
            yield number, raw, True


def physical_line(path: Path, ordinal: int) -> tuple[int, bytes]:
    """The line number and bytes of the ``ordinal``-th non-blank line (DuckDB's numbering)."""
    seen = 0
    for number, raw, complete in _lines(path):
        if not complete or raw.strip():
            seen += 1
            if seen == ordinal:
                return number, raw
    raise DataFormatError(path, f"at least {ordinal} non-blank lines", f"{seen}")


def physical_lines(path: Path, ordinals: set[int]) -> dict[int, int]:
    """Line numbers of several non-blank-line ordinals, in one pass over the file."""
    found: dict[int, int] = {}
    seen = 0
    for number, raw, complete in _lines(path):
        if len(found) == len(ordinals):
            break
        if not complete or raw.strip():
            seen += 1
            if seen in ordinals:
                found[seen] = number
    return found


def line_problem(raw: bytes, complete: bool) -> str | None:
    """Why one line cannot be parsed as JSON (None when it can)."""
    if not complete:
        return (
            f"a line longer than {MAX_LINE_BYTES // 2**20} MiB (was the file written as one huge line, "
            "without a line break after each record?)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"bytes that are not UTF-8 at byte {exc.start} of the line: {raw[exc.start:exc.start + 8]!r}"
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            return f"more than one JSON value on the line (at column {exc.colno}: lines joined without a line break?)"
        truncated = " (the line looks truncated)" if not raw.endswith(b"\n") else ""
        return f"invalid JSON{truncated}: {exc}"
    except RecursionError:
        return "JSON nested too deeply to be a record"
    return None


def diagnose_lines(path: Path, expected: str) -> None:
    """Raise a DataFormatError at the first line DuckDB cannot parse; return if there is none."""
    for number, raw, complete in _lines(path):
        if complete and not raw.strip():
            continue
        problem = line_problem(raw, complete)
        if problem:
            raise DataFormatError(path, expected, problem, line=number)


def short(exc: BaseException, limit: int = 300) -> str:
    """The first line of a DuckDB error, cut to ``limit`` characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
