"""Bad input leaves a step as dagster.Failure (message, file, line and fix as metadata, the
project's error as its cause); only a transient Hub failure may be retried, with backoff."""

from __future__ import annotations

import pytest
from dagster import Backoff, Failure

from assets.failures import as_failure, explained_failures
from assets.raw import raw_dataset
from taac_dagster.errors import DataFormatError, SourceUnavailableError
from taac_dagster.locks import TrackBusyError


def test_a_data_format_error_becomes_a_failure_naming_file_line_and_fix(tmp_path):
    error = DataFormatError(tmp_path / "seq.jsonl", "integer Unix seconds (>= 0)", '"17" (a string)',
                            line=7, record=0, field="timestamp")
    with pytest.raises(Failure) as caught, explained_failures():
        raise error
    failure = caught.value
    assert failure.__cause__ is error and str(error) in failure.description and "To fix:" in failure.description
    meta = {key: getattr(value, "value", value) for key, value in failure.metadata.items()}
    assert meta["file"] == str(tmp_path / "seq.jsonl") and meta["line"] == 7 and meta["record"] == 0
    assert meta["field"] == "timestamp" and meta["found"] == '"17" (a string)' and "row" not in meta
    assert "docs/data.md" in meta["fix"] and not failure.allow_retries


def test_only_transient_source_failures_may_be_retried():
    assert as_failure(SourceUnavailableError("the Hub could not be reached (HTTP 503)", transient=True)).allow_retries
    assert not as_failure(SourceUnavailableError("revision 'v9' does not exist")).allow_retries
    busy = as_failure(TrackBusyError("track 1M is being written by run r"))
    assert not busy.allow_retries and "TAAC_TRACK_LOCK_TIMEOUT" in busy.metadata["fix"].value


def test_other_exceptions_pass_through_unchanged():
    with pytest.raises(KeyError), explained_failures():
        raise KeyError("a bug, not bad input")


def test_the_hub_download_asset_retries_with_backoff():
    policy = raw_dataset.op.retry_policy
    assert policy.max_retries >= 2 and policy.backoff == Backoff.EXPONENTIAL and policy.delay > 0
